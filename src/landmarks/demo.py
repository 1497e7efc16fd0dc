"""``landmarks demo``: the whole system on this machine, offline, from nothing, in about 10 minutes.

Stages (each one is skipped when its output already exists, so a killed demo resumes):

1. ``data/``: a synthetic GLDv2-shaped dataset (:mod:`landmarks.data.synth`);
2. ``run/``: the ``cpu`` preset (EfficientNet-Lite0 fine-tuned from the ImageNet weights installed with the
   package; ``preset="cpu-scratch"``: random initialisation) trained within a time budget;
3. ``index/``: the training images embedded into a FAISS index with the non-landmark set and local
   features for re-ranking; ``retrieval-index/``: the unlabelled ``index.csv`` images, for mAP@100
   (:func:`landmarks.pipeline.build_index`, resumable);
4. ``predictions/<variant>.csv``: the test queries recognized without and with the out-of-domain
   handling and with local re-ranking, and ``<variant>.retrieval.csv``: the retrieval queries ranked
   against ``retrieval-index/`` the same way (:func:`landmarks.pipeline.recognize_queries`);
5. ``report.html`` for the last variant, and ``summary.json`` / ``summary.md`` with the table printed at
   the end (GAP, GAP ignoring non-landmarks, top-1, mAP@100 and the time of each stage).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from landmarks.config import to_dict
from landmarks.utils.io import write_json

logger = logging.getLogger("landmarks")


@dataclass
class Variant:
    """One way of recognizing the test queries."""

    name: str  # label in the summary table (and the predictions file name)
    ood: bool  # out-of-domain handling with the index's non-landmark set
    rerank: str = "none"  # "none" or "local" (local features + RANSAC on the top candidates)


DEFAULT_VARIANTS = (
    Variant("global", ood=False),
    Variant("global+ood", ood=True),
    Variant("global+ood+rerank", ood=True, rerank="local"),
)


@dataclass
class DemoConfig:
    """What the demo runs; the defaults fit in about 10 minutes on 2 CPU cores."""

    seed: int = 0  # seed of the dataset, the training run and RANSAC
    landmarks: int = 100  # synthetic landmarks (the long tail follows)
    queries: int = 1000  # test queries (90% show no landmark)
    preset: str = "cpu"  # training preset (see landmarks.models.presets)
    # time budget of the training run (whole schedule): 4, not 5, since the `cpu` preset's Lite0 at 224 px embeds
    # ~3.8x slower per image than the former resnet10t at 128 px (~7,400 images embedded after training)
    train_minutes: float = 4.0
    local_features: str = "sift"  # local features for re-ranking: "sift" or "model" (the run's DELG head)
    variants: tuple[Variant, ...] = field(default_factory=lambda: DEFAULT_VARIANTS)  # recognition variants
    device: str = "auto"  # torch device


class _Timer:
    """Collects the wall time of each stage (0 when it was skipped as already done)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def stage(self, name: str, done: bool, fn: Callable[[], Any]) -> None:
        if done:
            logger.info("demo: %s already done, skipped", name)
            self.seconds[name] = 0.0
            return
        logger.info("demo: %s ...", name)
        t = time.perf_counter()
        fn()
        self.seconds[name] = round(time.perf_counter() - t, 1)
        logger.info("demo: %s done in %.1f s", name, self.seconds[name])


def evaluate_variant(predictions_csv: Path, retrieval_csv: Path | None, data: Path) -> dict[str, float]:
    """GAP, GAP ignoring non-landmarks, top-1 and (when ``retrieval_csv``) mAP@100 of one variant."""
    from landmarks import metrics, submission

    sol = submission.read_recognition_solution(data / "recognition_solution.csv")
    pred = submission.read_recognition_predictions(predictions_csv, sol)
    out = dict(metrics.recognition_metrics(pred, sol.truth))
    if retrieval_csv is not None and retrieval_csv.exists():
        rsol = submission.read_retrieval_solution(data / "retrieval_solution.csv")
        ranked = submission.read_retrieval_predictions(retrieval_csv)
        ranked = {q: ids for q, ids in ranked.items() if q in rsol.truth}  # queries the solution scores
        out["map@100"] = metrics.mean_average_precision(ranked, rsol.truth, k=100)
    return out


def format_table(rows: list[dict[str, Any]], seconds: dict[str, float]) -> str:
    """The summary as a markdown table (metrics in %), then the stage times."""
    lines = ["| variant | GAP | GAP (landmark queries) | top-1 | mAP@100 |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        m = r["metrics"]
        cells = [
            f"{100 * m[k]:.2f}" if isinstance(m.get(k), float) else "–"
            for k in ("gap", "gap_ignore_non_landmarks", "top1_accuracy", "map@100")
        ]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    lines += ["", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    lines.append(f"| total | {sum(seconds.values()):.1f} |")
    return "\n".join(lines)


def run_demo(out: str | Path, conf: DemoConfig | None = None) -> dict[str, Any]:
    """Run every stage into ``out``; returns the summary (also written to ``out/summary.json``)."""
    from landmarks.data.synth import SynthConfig, generate
    from landmarks.train import make_config, train

    conf = conf or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data, run, index, rindex = out / "data", out / "run", out / "index", out / "retrieval-index"
    pred_dir = out / "predictions"
    timer = _Timer()
    t0 = time.perf_counter()

    synth_conf = SynthConfig(seed=conf.seed, n_landmarks=conf.landmarks, n_queries=conf.queries)
    timer.stage("synth", (data / "synth.json").exists(), lambda: generate(data, synth_conf))

    def _train() -> None:
        tconf = make_config(conf.preset, {"seed": conf.seed})
        resume = (run / "train_state.json").exists()
        train(
            tconf,
            data / "train.csv",
            run,
            resume=resume,
            time_budget_min=conf.train_minutes,
            device=conf.device,
        )
        (run / "DEMO_DONE").write_text("trained\n")

    timer.stage("train", (run / "DEMO_DONE").exists(), _train)

    from landmarks.data.collection import load_images
    from landmarks.pipeline import build_index, recognize_queries
    from landmarks.recognize import RecognizeConfig
    from landmarks.submission import read_retrieval_solution

    need_local = any(v.rerank == "local" for v in conf.variants)
    local = conf.local_features if need_local else None
    timer.stage(
        "index",
        (index / "meta.json").exists(),
        lambda: build_index(
            run,
            data / "train.csv",
            index,
            non_landmarks=data / "nonlandmarks",
            local=local,
            device=conf.device,
        ),
    )
    timer.stage(
        "retrieval-index",
        (rindex / "meta.json").exists(),
        lambda: build_index(
            run, data / "index.csv", rindex, unlabelled=True, local=local, device=conf.device
        ),
    )

    # the retrieval task scores the landmark queries of retrieval_solution.csv (mAP@100)
    scored = set(read_retrieval_solution(data / "retrieval_solution.csv").truth)
    retrieval_queries = [r for r in load_images([data / "test.csv"]) if r.id in scored]
    rows = []
    for v in conf.variants:
        csv_path = pred_dir / f"{v.name}.csv"
        retrieval_csv = pred_dir / f"{v.name}.retrieval.csv"
        rconf = RecognizeConfig(ood=v.ood, rerank=v.rerank, seed=conf.seed)

        def _recognize(v: Variant = v, csv_path: Path = csv_path, rconf: RecognizeConfig = rconf) -> None:
            recognize_queries(
                index,
                data / "test.csv",
                csv_path,
                conf=rconf,
                device=conf.device,
                neighbours_jsonl=pred_dir / f"{v.name}.neighbours.jsonl",
            )

        def _retrieve(
            csv_path: Path = csv_path, retrieval_csv: Path = retrieval_csv, rconf: RecognizeConfig = rconf
        ) -> None:
            recognize_queries(
                rindex,
                retrieval_queries,
                csv_path.with_suffix(".retrieval-recognition.csv"),
                conf=rconf,
                device=conf.device,
                retrieval_csv=retrieval_csv,
            )

        timer.stage(f"recognize {v.name}", csv_path.exists(), _recognize)
        timer.stage(f"retrieve {v.name}", retrieval_csv.exists(), _retrieve)
        rows.append({"variant": v.name, "metrics": evaluate_variant(csv_path, retrieval_csv, data)})

    last = conf.variants[-1].name
    report = out / "report.html"

    def _report() -> None:
        from landmarks.report import write_report

        write_report(
            pred_dir / f"{last}.csv",
            data / "recognition_solution.csv",
            report,
            neighbours_jsonl=pred_dir / f"{last}.neighbours.jsonl",
            index_dir=index,
        )

    timer.stage("report", report.exists(), _report)
    summary = {
        "config": to_dict(conf),
        "results": rows,
        "seconds": timer.seconds,
        "wall_s": round(time.perf_counter() - t0, 1),
        "report": str(report),
    }
    write_json(out / "summary.json", summary)
    table = format_table(rows, timer.seconds)
    (out / "summary.md").write_text(table + "\n", encoding="utf-8")
    summary["table"] = table
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """Print the table and where the report is."""
    print(summary["table"])
    print(f"\nreport: {summary['report']}")
    print(json.dumps({r["variant"]: r["metrics"] for r in summary["results"]}))
