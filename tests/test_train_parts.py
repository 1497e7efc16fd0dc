"""The pieces of the trainer on their own: the budget planner, the run writer, and a trainer that leaves
its caller's config alone."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from landmarks.config import to_dict
from landmarks.train import Trainer, make_config
from landmarks.train_budget import BudgetPlanner, Rates, plan_steps
from landmarks.train_writer import RunWriter


def _planner(budget_s: float = 1000.0) -> BudgetPlanner:
    return BudgetPlanner(
        budget_s, elapsed_before=0.0, t_start=time.perf_counter(), eval_images=100, eval_every=1
    )


def test_first_plan_is_plan_steps_of_the_budget() -> None:
    planner = _planner()
    rates = Rates(step_s=1.0, eval_img_s=0.01, ckpt_s=0.5)
    total, every, replan_every = planner.first_plan(rates, spe=50)
    # oracle: plan_steps with the budget's own overheads (evaluation = 100 images x 0.01 s + 1 s)
    want, want_every = plan_steps(
        1000.0, 1.0, 50, 2.0, epoch_overhead_s=1.5, final_s=1.0 + 20.0, eval_every=1
    )
    assert abs(total - want) <= 1 and every == want_every  # the budget's clock ran a few microseconds
    assert replan_every == 50  # every 5 % of 1000 s at 1 s per step
    assert (planner.last_eval_img_s, planner.last_ckpt_s) == (0.01, 0.5)


def test_replan_keeps_a_close_plan_and_resizes_a_far_one() -> None:
    planner = _planner()
    rates = Rates(step_s=1.0, eval_img_s=0.01, ckpt_s=0.5)
    total, every, _ = planner.first_plan(rates, spe=50)
    planner.add_training_time(100.0, 100)  # measured: 1 s per step, as planned
    assert planner.replan(0, total, every, 50, {}, step_s=1.0) == (total, every)  # within 2 %: unchanged
    # twice as slow as planned: about half the steps fit; the validation interval only widens
    new_total, new_every = planner.replan(0, total, 3, 50, {}, step_s=2.0)
    assert abs(new_total - total // 2) <= 25 and new_every >= 3
    # an epoch-end row feeds the latest validation and checkpoint costs
    planner.replan(50, total, every, 50, {"train_s": 50.0, "epoch_steps": 50, "eval_s": 4.0, "ckpt_s": 2.0})
    assert planner.last_eval_img_s == pytest.approx(0.04) and planner.last_ckpt_s == 2.0


def test_run_writer_log_rows_and_other_ranks(tmp_path: Path) -> None:
    w = RunWriter(tmp_path / "run", is_main=True)
    w.prepare()
    for row in ({"epoch": 2, "v": 1}, {"epoch": 1, "v": 2}, {"epoch": 2, "v": 3}):
        w.append_log(row)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows == [{"epoch": 1, "v": 2}, {"epoch": 2, "v": 3}]  # epoch order, a rewritten epoch replaced
    w.add_skipped([("a.jpg", "truncated"), ("a.jpg", "truncated")])
    assert (tmp_path / "run" / "skipped.csv").read_text().splitlines() == ["path,reason", "a.jpg,truncated"]
    other = RunWriter(tmp_path / "other", is_main=False)
    other.prepare()
    other.write_config({"a": 1})
    other.append_log({"epoch": 1})
    other.add_skipped([("b.jpg", "x")])
    assert not (tmp_path / "other").exists() and other.skipped_csv is None


def test_trainer_leaves_the_callers_config_alone(tmp_path: Path) -> None:
    import cv2

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "data" / f"lm{c}").mkdir(parents=True)
        for i in range(6):
            cv2.imwrite(
                str(tmp_path / "data" / f"lm{c}" / f"{i}.jpg"), rng.integers(0, 256, (32, 32, 3), np.uint8)
            )
    conf = make_config("tiny", {"batch_size": 4, "local_only": True, "data": {"image_size": 32}})
    before = copy.deepcopy(to_dict(conf))
    torch.set_num_threads(1)
    tr = Trainer(conf, tmp_path / "data", tmp_path / "run", time_budget_min=0.5, device="cpu")  # type: ignore[arg-type]
    assert to_dict(conf) == before  # not the budget, not the local head, not the steps
    resolved = tr.resolved_config()
    assert resolved["time_budget_min"] == 0.5 and resolved["model"]["local"]["enabled"] is True
    tr.schedule.total, tr.spe = 7, 3
    assert (tr.resolved_config()["steps"], tr.resolved_config()["epochs"]) == (7, 3)
    assert to_dict(conf) == before
