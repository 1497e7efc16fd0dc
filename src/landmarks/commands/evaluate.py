"""``landmarks evaluate recognition|retrieval``: score Kaggle CSVs against a solution file.

Recognition reports GAP, GAP ignoring non-landmark queries and top-1 accuracy; retrieval reports
mAP@k, mean precision@{1,5,10,50,100} and the mean/median rank of the first correct result. Scores
are given for all scored queries and, when the solution has a ``Usage`` column, for its Public and
Private parts. ``--json`` prints one object ``{"all": {...}, "public": {...}, "private": {...}}``
(an undefined figure, e.g. GAP of a split without landmark queries, is ``null``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from landmarks import metrics, submission

log = logging.getLogger("landmarks")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands ``recognition`` and ``retrieval``, each with ``--solution``, ``--predictions``, ``--json``."""
    sub = parser.add_subparsers(dest="task", metavar="TASK", title="tasks", required=True)
    rec = sub.add_parser(
        "recognition",
        help="GAP, GAP ignoring non-landmark queries, top-1 accuracy",
        description="Score a recognition submission (id,landmarks with '<landmark> <score>' cells) "
        "against a solution (id,landmarks,Usage).",
    )
    ret = sub.add_parser(
        "retrieval",
        help="mAP@k, mean precision@{1,5,10,50,100}, mean/median first-correct rank",
        description="Score a retrieval submission (id,images, best first) against a solution (id,images,Usage).",
    )
    for p, cols in ((rec, "landmarks"), (ret, "images")):
        p.add_argument("--solution", required=True, type=Path, metavar="S.csv", help=f"solution: id,{cols},Usage")
        p.add_argument("--predictions", required=True, type=Path, metavar="P.csv", help=f"submission: id,{cols}")
        p.add_argument("--json", action="store_true", help='print {"all": {...}, "public": {...}, "private": {...}}')
    ret.add_argument(
        "--k",
        type=_positive_int,
        default=100,
        metavar="K",
        help="cut-off of mAP@K and of the first-correct rank (K+1 when none); default 100",
    )


def _splits(sol: submission.Solution) -> dict[str, dict[str, list[str]]]:
    out = {"all": sol.truth}
    if sol.has_usage:
        out["public"] = sol.split("Public")
        out["private"] = sol.split("Private")
    return out


def _restrict(predictions: Mapping[str, Any], truth: Mapping[str, Any]) -> dict[str, Any]:
    return {q: p for q, p in predictions.items() if q in truth}


def _json_value(x: float) -> float | None:
    return None if math.isnan(x) else x


def _fmt(x: float, percent: bool) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{100 * x:.2f}" if percent else f"{x:.2f}"


def _table(
    results: dict[str, dict[str, float]],
    counts: dict[str, int],
    columns: list[tuple[str, str, bool]],
) -> str:
    """Rows = splits, columns = (key, title, shown as percent)."""
    header = ["split", "queries", *[title for _, title, _ in columns]]
    rows = [
        [split, str(counts[split]), *[_fmt(values[key], pct) for key, _, pct in columns]]
        for split, values in results.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    return "\n".join(lines)


def evaluate(
    task: str, solution_path: str | Path, predictions_path: str | Path, k: int = 100
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Read both files and score them per split. Returns ``(results, queries per split)``.

    ``results`` maps ``"all"`` (and ``"public"``/``"private"`` when the solution has Usage) to the
    metric dictionary of :func:`landmarks.metrics.recognition_metrics` or
    :func:`landmarks.metrics.retrieval_metrics`.
    """
    t0 = time.perf_counter()
    sol = submission.read_solution(solution_path, task)
    splits = _splits(sol)
    results: dict[str, dict[str, float]]
    if task == submission.RECOGNITION:
        rec_preds = submission.read_recognition_predictions(predictions_path, sol)
        n_preds = len(rec_preds)
        t1 = time.perf_counter()
        if sol.usage is not None:
            group_of = {q: use.lower() for q, use in sol.usage.items()}
            by_group = metrics.recognition_metrics_by_group(rec_preds, sol.truth, group_of)
            results = {name: by_group.get(name, metrics.recognition_metrics({}, {})) for name in splits}
        else:
            results = {"all": metrics.recognition_metrics(rec_preds, sol.truth)}
    else:
        ret_preds = submission.read_retrieval_predictions(predictions_path, sol)
        n_preds = len(ret_preds)
        t1 = time.perf_counter()
        results = {
            name: metrics.retrieval_metrics(_restrict(ret_preds, truth), truth, k=k) for name, truth in splits.items()
        }
    log.debug(
        "%s: %d queries (%d ignored), %d predictions; read in %.2f s, scored in %.2f s",
        task, len(sol.truth), len(sol.ignored), n_preds, t1 - t0, time.perf_counter() - t1,
    )
    return results, {name: len(truth) for name, truth in splits.items()}


def run(args: argparse.Namespace) -> int:
    """Score the files and print a table (or JSON with ``--json``). Bad files raise DataFormatError (exit 2)."""
    k = getattr(args, "k", 100)
    results, counts = evaluate(args.task, args.solution, args.predictions, k=k)
    if args.json:
        print(json.dumps({s: {key: _json_value(v) for key, v in r.items()} for s, r in results.items()}, indent=2))
        return 0
    if args.task == submission.RECOGNITION:
        columns = [
            ("gap", "GAP", True),
            ("gap_ignore_non_landmarks", "GAP (landmark queries only)", True),
            ("top1_accuracy", "top-1 acc.", True),
        ]
    else:
        columns = [
            (f"map@{k}", f"mAP@{k}", True),
            *[(f"mean_precision@{r}", f"P@{r}", True) for r in metrics.PRECISION_RANKS],
            ("mean_position", "mean pos.", False),
            ("median_position", "median pos.", False),
        ]
    units = "scores in %" if args.task == submission.RECOGNITION else "scores in %, positions in ranks"
    print(f"{args.task}: {args.predictions} against {args.solution} ({units})")
    print(_table(results, counts, columns))
    return 0
