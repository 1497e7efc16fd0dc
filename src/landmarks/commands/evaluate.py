"""``landmarks evaluate recognition|retrieval|revisited``: score Kaggle CSVs, or run the Revisited protocol.

Recognition reports GAP, GAP ignoring non-landmark queries and top-1 accuracy; retrieval reports
mAP@k, mean precision@{1,5,10,50,100} and the mean/median rank of the first correct result. Scores
are given for all scored queries and, when the solution has a ``Usage`` column, for its Public and
Private parts. ``--json`` prints one object ``{"all": {...}, "public": {...}, "private": {...}}``
(an undefined figure, e.g. GAP of a split without landmark queries, is ``null``).

``revisited`` runs a model on Revisited Oxford/Paris as revisitop publishes them (``ROOT/jpg/`` and
``ROOT/gnd_<dataset>.pkl`` or ``.json``): queries cropped to their boxes, mAP and mP@{1,5,10} for Easy,
Medium and Hard, ``+R1M`` with ``--distractors`` (see :mod:`landmarks.retrieval`)::

    landmarks evaluate revisited --data datasets/roxford5k --dataset roxford5k --model runs/b3 [--qe 2] [--dba 2]
    landmarks evaluate revisited --data datasets --dataset rparis6k --index index/ --distractors revisitop1m/jpg
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
from landmarks.commands._index_common import add_extraction_arguments, resolve_device, setup_threads
from landmarks.errors import LandmarksError

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
        p.add_argument(
            "--solution", required=True, type=Path, metavar="S.csv", help=f"solution: id,{cols},Usage"
        )
        p.add_argument(
            "--predictions", required=True, type=Path, metavar="P.csv", help=f"submission: id,{cols}"
        )
        p.add_argument(
            "--json", action="store_true", help='print {"all": {...}, "public": {...}, "private": {...}}'
        )
    rev = sub.add_parser(
        "revisited",
        help="Revisited Oxford/Paris protocol: Easy/Medium/Hard mAP and mP@1,5,10 (+R1M)",
        description="Run a model on roxford5k / rparis6k in revisitop layout (ROOT/jpg/*.jpg and "
        "ROOT/gnd_<dataset>.pkl or .json; the pickle is read with a restricted unpickler): queries cropped "
        "to their boxes, embeddings resumable in --work.",
    )
    rev.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="ROOT",
        help="the dataset folder (holding jpg/ and gnd_<dataset>.pkl), or the folder above it",
    )
    rev.add_argument(
        "--dataset",
        default="roxford5k",
        metavar="NAME",
        help="roxford5k (default), rparis6k or another name with gnd_NAME.pkl/.json",
    )
    src = rev.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default=None, help="trained run folder (or checkpoint file)")
    src.add_argument("--index", default=None, help="an index folder: its model and views are used")
    dis = rev.add_mutually_exclusive_group()
    dis.add_argument(
        "--distractors",
        nargs="+",
        default=None,
        metavar="SRC",
        help="+R1M: distractor images (folders, list files) appended to the database",
    )
    dis.add_argument(
        "--distractor-features",
        type=Path,
        default=None,
        metavar="F.npy",
        help="+R1M: the distractors' features already extracted with this model, (M, D) .npy",
    )
    rev.add_argument(
        "--work",
        type=Path,
        default=None,
        help="crops and resumable embeddings (default: ROOT/.landmarks-work/<model fingerprint>)",
    )
    rev.add_argument(
        "--qe", type=_nonnegative_int, default=0, metavar="N", help="alpha-QE with N neighbours (0: off)"
    )
    rev.add_argument("--qe-alpha", type=float, default=3.0, metavar="A", help="alpha of --qe (default 3)")
    rev.add_argument(
        "--dba", type=_nonnegative_int, default=0, metavar="N", help="DBA with N neighbours (0: off)"
    )
    rev.add_argument("--dba-alpha", type=float, default=3.0, metavar="A", help="alpha of --dba (default 3)")
    rev.add_argument(
        "--multiscale", action="store_true", help="embed at scales 0.707, 1, 1.414 (with --model)"
    )
    rev.add_argument(
        "--depth",
        type=_positive_int,
        default=10_000,
        help="ranks kept per query when the database is larger (default 10000)",
    )
    rev.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_extraction_arguments(rev)
    ret.add_argument(
        "--k",
        type=_positive_int,
        default=100,
        metavar="K",
        help="cut-off of mAP@K and of the first-correct rank (K+1 when none); default 100",
    )


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


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
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    ]
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
            name: metrics.retrieval_metrics(_restrict(ret_preds, truth), truth, k=k)
            for name, truth in splits.items()
        }
    log.debug(
        "%s: %d queries (%d ignored), %d predictions; read in %.2f s, scored in %.2f s",
        task,
        len(sol.truth),
        len(sol.ignored),
        n_preds,
        t1 - t0,
        time.perf_counter() - t1,
    )
    return results, {name: len(truth) for name, truth in splits.items()}


def run(args: argparse.Namespace) -> int:
    """Score the files and print a table (or JSON with ``--json``). Bad files raise DataFormatError (exit 2)."""
    if args.task == "revisited":
        return run_revisited(args)
    k = getattr(args, "k", 100)
    results, counts = evaluate(args.task, args.solution, args.predictions, k=k)
    if args.json:
        print(
            json.dumps(
                {s: {key: _json_value(v) for key, v in r.items()} for s, r in results.items()}, indent=2
            )
        )
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


def run_revisited(args: argparse.Namespace) -> int:
    """``landmarks evaluate revisited``: print Easy/Medium/Hard mAP and mP@k (or JSON); returns 0."""
    from landmarks import extract
    from landmarks.data.revisited import find_dataset
    from landmarks.expansion import ExpansionConfig
    from landmarks.retrieval import KAPPAS, evaluate_revisited

    dataset = find_dataset(args.data, args.dataset)
    device = resolve_device(args.device)
    setup_threads(device, args.threads, args.workers)
    scales: tuple[float, ...] = extract.MULTISCALE if args.multiscale else (1.0,)
    flip = False
    project = None
    if args.index is not None:
        from landmarks.index import LandmarkIndex

        index = LandmarkIndex.load(args.index)
        source = index.meta["model"].get("source")
        if not source or not Path(source).exists():
            raise LandmarksError(
                f"{args.index}: the model recorded in meta.json ({source}) is not there; pass --model"
            )
        embedder = extract.load_embedder(source, device=device)
        index.check_model(embedder.fingerprint)
        scales, flip = tuple(index.views.get("scales", [1.0])), bool(index.views.get("flip"))
        if index.whitening is not None:
            project = index.project
    else:
        embedder = extract.load_embedder(args.model, device=device)
    conf = extract.ExtractConfig(
        batch_size=args.batch_size, num_workers=args.workers, scales=scales, flip=flip
    )
    work = args.work or dataset.root / ".landmarks-work" / embedder.fingerprint[:16]
    res = evaluate_revisited(
        embedder,
        dataset,
        work,
        extract_conf=conf,
        qe=ExpansionConfig(args.qe, args.qe_alpha),
        dba=ExpansionConfig(args.dba, args.dba_alpha),
        distractors=args.distractors,
        distractor_features=args.distractor_features,
        depth=args.depth,
        project=project,
    )
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
        return 0
    name = dataset.name + ("+R1M" if res.distractors else "")
    table = {
        split.capitalize(): {"map": v["map"], **{f"mp@{k}": p for k, p in zip(KAPPAS, v["mp@k"])}}
        for split, v in res.results.items()
    }
    counts = {
        split.capitalize(): sum(
            1
            for g in dataset.truth.gnd
            if any(len(getattr(g, key)) for key in metrics.REVISITED_PROTOCOLS[split][0])
        )
        for split in res.results
    }
    print(
        f"{name}: {res.queries} queries, {res.database} images"
        + (f" + {res.distractors} distractors" if res.distractors else "")
        + f", model {embedder.describe().get('name')}"
        + (f", QE n={args.qe}" if args.qe else "")
        + (f", DBA n={args.dba}" if args.dba else "")
        + " (scores in %)"
    )
    print(_table(table, counts, [("map", "mAP", True), *[(f"mp@{k}", f"mP@{k}", True) for k in KAPPAS]]))
    return 0
