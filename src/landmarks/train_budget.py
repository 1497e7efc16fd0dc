"""Time budgets for training: size a schedule to a number of minutes from measured rates, re-size it as it runs.

The training loop (:class:`landmarks.train.Trainer`) measures what things cost (:class:`Rates`: one
optimizer step, one validation image, one checkpoint) and asks the :class:`BudgetPlanner` how many steps
fit and how often to validate; every ``replan_every`` steps and at each epoch end it feeds the planner
the rates measured since, and adopts the planner's answer (rank 0 decides, every rank adopts it at the
same step). :func:`plan_steps` is the pure rule underneath.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Rates:
    """What one unit of training work costs, in seconds."""

    step_s: float  # one optimizer step (all its micro-batches)
    eval_img_s: float  # one image embedded by a validation
    ckpt_s: float  # one checkpoint write (training state)


def plan_steps(
    avail_s: float,
    step_s: float,
    steps_per_epoch: int,
    eval_s: float,
    epoch_overhead_s: float,
    final_s: float,
    eval_every: int = 1,
    max_eval_share: float = 0.15,
) -> tuple[int, int]:
    """Optimizer steps that fit a time budget, and the evaluation interval to use.

    The largest ``steps`` with ``steps · step_s + epochs · epoch_overhead_s + evals · eval_s + final_s
    <= avail_s``, where ``epochs = ceil(steps / steps_per_epoch)`` and ``evals = ceil(epochs / every)``;
    the interval ``every`` (at least ``eval_every``) grows so that evaluations take at most
    ``max_eval_share`` of the budget. Returns ``(steps >= 1, every)``.
    """
    max_evals = max(1, int(max_eval_share * avail_s / max(eval_s, 1e-9)))

    def cost(steps: int) -> tuple[float, int]:
        epochs = math.ceil(steps / steps_per_epoch)
        every = max(1, eval_every, math.ceil(epochs / max_evals))
        evals = math.ceil(epochs / every)
        return steps * step_s + epochs * epoch_overhead_s + evals * eval_s + final_s, every

    lo, hi = 1, max(1, int(avail_s / max(step_s, 1e-9)))
    while lo < hi:  # the cost grows with the steps: binary search for the last that fits
        mid = (lo + hi + 1) // 2
        if cost(mid)[0] <= avail_s:
            lo = mid
        else:
            hi = mid - 1
    return lo, cost(lo)[1]


class BudgetPlanner:
    """Sizes and re-sizes a training schedule to end within ``budget_s``.

    Args:
        budget_s: the whole run's budget (all sessions).
        elapsed_before: seconds spent by earlier sessions of the run (resume).
        t_start: ``time.perf_counter()`` when this session started.
        eval_images: images one validation embeds (queries + kNN database).
        eval_every: the configured validation interval in epochs (the planner only widens it).
    """

    def __init__(
        self, budget_s: float, elapsed_before: float, t_start: float, eval_images: int, eval_every: int
    ):
        self.budget_s = budget_s
        self.elapsed_before = elapsed_before
        self.t_start = t_start
        self.eval_images = max(1, eval_images)
        self.eval_every = eval_every
        self.last_eval_img_s = 0.0  # the latest measured cost of a validation image
        self.last_ckpt_s = 0.5  # the latest measured cost of a checkpoint
        self.train_s = 0.0  # seconds spent in training loops in this session
        self.train_steps = 0  # their optimizer steps

    def remaining_s(self) -> float:
        """Seconds of the budget left now."""
        return self.budget_s - (self.elapsed_before + time.perf_counter() - self.t_start)

    def eval_estimate_s(self, rates: Rates) -> float:
        """Seconds one validation takes at ``rates``."""
        return rates.eval_img_s * self.eval_images + 1.0

    def plan(self, remaining_s: float, rates: Rates, spe: int) -> tuple[int, int]:
        """``(steps, eval_every)`` that fit ``remaining_s`` at ``rates``, with ``spe`` steps per epoch."""
        ckpt_s = rates.ckpt_s
        return plan_steps(
            remaining_s,
            rates.step_s,
            spe,
            self.eval_estimate_s(rates),
            epoch_overhead_s=2 * ckpt_s + 0.5,
            final_s=2 * ckpt_s + 0.02 * remaining_s,
            eval_every=self.eval_every,
        )

    def first_plan(self, rates: Rates, spe: int) -> tuple[int, int, int]:
        """The schedule of a new run: ``(total steps, eval_every, replan_every)``; re-plans come every ~5 % of
        the budget (at least 10 s) of steps."""
        self.last_eval_img_s, self.last_ckpt_s = rates.eval_img_s, rates.ckpt_s
        total, every = self.plan(self.remaining_s(), rates, spe)
        replan_every = max(1, int(max(10.0, 0.05 * self.budget_s) / max(rates.step_s, 1e-6)))
        return total, every, replan_every

    def add_training_time(self, seconds: float, steps: int) -> None:
        """Record ``steps`` optimizer steps that took ``seconds`` of loop time."""
        self.train_s += seconds
        self.train_steps += steps

    def mean_step_s(self, extra_s: float = 0.0, extra_steps: int = 0) -> float:
        """Seconds per step over this session's loops (plus a loop in progress)."""
        return (self.train_s + extra_s) / max(1, self.train_steps + extra_steps)

    def replan(
        self,
        step: int,
        total: int,
        eval_every: int,
        spe: int,
        row: dict[str, Any],
        step_s: float | None = None,
    ) -> tuple[int, int]:
        """The schedule ``(total, eval_every)`` to continue with from ``step``.

        ``row``: the epoch-end log row (its ``train_s``, ``epoch_steps``, ``eval_s``, ``ckpt_s`` are the
        latest measurements; ``{}`` mid-epoch); ``step_s``: a step time measured mid-epoch. The total
        changes only when the new plan differs by more than 2 %; the interval only widens.
        """
        remaining = self.remaining_s()
        if step_s is None:
            epoch_rate = float(row.get("train_s", 1.0)) / max(1, int(row.get("epoch_steps", 1)))
            step_s = 0.5 * (epoch_rate + self.mean_step_s())
        if "eval_s" in row:
            self.last_eval_img_s = float(row["eval_s"]) / self.eval_images
        if "ckpt_s" in row:
            self.last_ckpt_s = float(row["ckpt_s"])
        rates = Rates(step_s, self.last_eval_img_s, self.last_ckpt_s)
        # Time still owed to the epoch in progress: its evaluation and checkpoint.
        owed = (2 * rates.ckpt_s + self.eval_estimate_s(rates)) if step % spe else 0.0
        more, every = self.plan(remaining - owed, rates, spe)
        if abs(step + more - total) > 0.02 * total:
            return max(step, step + more), max(eval_every, every)
        return total, eval_every
