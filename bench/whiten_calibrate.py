"""Recognition with no training on real photos: PCA-whitening variants and the calibrated is_landmark.

Data: the split of ``bench/realworld.py`` (``index/<landmark>/``, ``nonlandmarks/``, ``queries/``,
``recognition_solution.csv``; made here with the same function and seed when ``--work`` lacks it). The
model is ``landmarks init --pretrained lite0`` (ImageNet EfficientNet-Lite0 + GeM p=3, 1280-d); the
index, non-landmark and query images are embedded once (resumable cache in ``--work``), then every
variant is built in memory with the library (``LandmarkIndex.build(whiten=...)``, ``Recognizer``), so
the rows differ only in the whitening: GAP and top-1 with and without the out-of-domain handling, side
by side in one run. The second table checks the calibrated ``is_landmark`` (``landmarks.calibrate``)
on the held-out queries: what the leave-one-out calibration promised vs what the queries got.

    python bench/whiten_calibrate.py [--work /tmp/landmarks-realworld] [--image-size 320]

Note: the whitening defaults of ``landmarks index --whiten`` were chosen from this table, i.e. on these
queries; a second collection is needed to confirm them.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))


class _Named:
    """The index and Recognizer only need a fingerprint and a description from the embedder."""

    fingerprint = "bench"

    def describe(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "name": "bench"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "realworld")
    ap.add_argument("--work", type=Path, default=Path("/tmp/landmarks-realworld"))
    ap.add_argument("--seed", type=int, default=0, help="seed of the split (bench/realworld.py's)")
    ap.add_argument("--pretrained", default="lite0")
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "whiten_calibrate.md")
    args = ap.parse_args()

    from landmarks import extract
    from landmarks.calibrate import CalibrationConfig, calibrate_index
    from landmarks.checkpoint import init_run
    from landmarks.data.collection import load_collection, load_images
    from landmarks.index import LandmarkIndex
    from landmarks.metrics import global_average_precision
    from landmarks.recognize import RecognizeConfig, Recognizer
    from landmarks.whiten import WhitenConfig

    if not (args.work / "recognition_solution.csv").exists():
        import realworld

        realworld.make_split(args.data, args.work, args.seed, 0.3, 0.5)
    run = args.work / f"init-{args.pretrained}-{args.image_size}"
    if not (run / "model.safetensors").exists():
        init_run(run, args.pretrained, image_size=args.image_size)
    emb = extract.load_embedder(run, "cpu")
    conf = extract.ExtractConfig(batch_size=16, num_workers=args.workers)
    t0 = time.perf_counter()
    idx_recs = load_collection(args.work / "index")
    nl_recs = load_images([args.work / "nonlandmarks"])
    q_recs = load_images([args.work / "queries"])
    cache = args.work / f"emb-{args.pretrained}-{args.image_size}"
    r_idx = extract.extract_embeddings(emb, idx_recs, cache / "index", conf, show_progress=False)
    r_nl = extract.extract_embeddings(emb, nl_recs, cache / "nl", conf, show_progress=False)
    r_q = extract.extract_embeddings(emb, q_recs, cache / "q", conf, show_progress=False)
    t_embed = time.perf_counter() - t0
    sol: dict[str, list[str]] = {}
    with open(args.work / "recognition_solution.csv", newline="") as f:
        for row in csv.DictReader(f):
            sol[row["id"]] = row["landmarks"].split() if row["landmarks"] else []
    qids = [q_recs[i].id for i in r_q.rows]
    kept = [idx_recs[i] for i in r_idx.rows]
    lmq = [q for q in qids if sol.get(q)]
    nlq = [q for q in qids if not sol.get(q)]

    def build(wh: WhitenConfig | None) -> LandmarkIndex:
        return LandmarkIndex.build(
            r_idx.embeddings,
            r_idx.ids,
            [r.landmark for r in kept],
            model=_Named().describe(),
            non_landmarks=r_nl.embeddings,
            non_landmark_ids=r_nl.ids,
            whiten=wh,
        )

    def scores(ix: LandmarkIndex, ood: bool) -> tuple[float, float, list[Any]]:
        res = Recognizer(ix, _Named(), RecognizeConfig(ood=ood)).recognize_embeddings(r_q.embeddings)
        preds = {q: (str(x.landmark), x.confidence) for q, x in zip(qids, res) if x.landmark}
        top1 = float(np.mean([preds.get(q, ("", 0.0))[0] in sol[q] for q in lmq]))
        return global_average_precision(preds, sol), top1, res

    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")  # as it goes: a killed run keeps its rows

    say(
        f"# Recognition with no training: {args.pretrained} + GeM at {args.image_size} px, PCA-whitening, calibrated "
        "is_landmark"
    )
    say()
    say(
        f"Split of `bench/realworld.py` (seed {args.seed}) of `../shared/data/realworld`: {len(r_idx.ids)} index images "
        f"of {len({r.landmark for r in kept})} landmarks, {len(r_nl.ids)} non-landmarks (N), {len(lmq)} landmark "
        f"queries and {len(nlq)} distractor queries. Embedded once ({t_embed:.0f} s, cached); every row is built "
        f"from the same embeddings. CPU {platform.machine()}, {os.cpu_count()} cores (shared machine)."
    )
    say()
    say("| whitening (learned on) | dim | shrinkage | GAP | top-1 | GAP + OOD | top-1 + OOD |")
    say("|---|---:|---:|---:|---:|---:|---:|")
    variants: list[tuple[str, WhitenConfig | None]] = [("none (GeM + L2)", None)]
    for with_nl in (False, True):
        for dim in (128, 256, 512):
            for s in (0.1, 1.0, 4.0):
                variants.append(
                    (
                        "index + N" if with_nl else "index",
                        WhitenConfig(dim=dim, shrinkage=s, with_non_landmarks=with_nl),
                    )
                )
    default = WhitenConfig()
    for name, wh in variants:
        ix = build(wh)
        g0, t0_, _ = scores(ix, False)
        g1, t1, _ = scores(ix, True)
        is_default = (
            wh is not None
            and (wh.dim or 256) == 256
            and wh.shrinkage == default.shrinkage
            and wh.with_non_landmarks == default.with_non_landmarks
        )
        mark = " **(default `--whiten`)**" if is_default else ""
        say(
            f"| {name}{mark} | {ix.d} | {'' if wh is None else f'{wh.shrinkage:g}'} | {100 * g0:.1f} | {100 * t0_:.1f} | "
            f"{100 * g1:.1f} | {100 * t1:.1f} |"
        )
    say()
    say(
        "Calibrated `is_landmark` (default voting, OOD on; prior: half the queries show no landmark). 'Promised' = "
        "the leave-one-out figures stored in the index; 'got' = the held-out queries."
    )
    say()
    say(
        "| index | target precision | threshold | promised: landmarks recognised above it / N above it | got: "
        "distractor queries 'yes' | landmark queries 'no' | 'yes' with the right landmark (landmark queries) |"
    )
    say("|---|---:|---:|---|---:|---:|---:|")
    for name, wh in (("GeM", None), ("GeM + default whitening", WhitenConfig())):
        ix = build(wh)
        for prec in (0.8, 0.9, 0.95):
            cal = calibrate_index(ix, CalibrationConfig(precision=prec))
            assert cal is not None
            ix.meta["calibration"] = cal
            _, _, res = scores(ix, True)
            yes = {q: x.is_landmark for q, x in zip(qids, res)}
            right = [str(x.landmark) in sol[q] for q, x in zip(qids, res) if sol.get(q) and x.is_landmark]
            say(
                f"| {name} | {prec} | {cal['threshold']:.3f} | {100 * cal['landmark_recall']:.1f}% / "
                f"{100 * cal['nonlandmark_yes']:.1f}% | {100 * np.mean([yes[q] for q in nlq]):.1f}% | "
                f"{100 * np.mean([not yes[q] for q in lmq]):.1f}% | {100 * np.mean(right):.1f}% |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
