"""Re-tune the local re-ranking score ``s + weight * min(inliers, c) / c`` on a benchmark's index.

The expensive part (RANSAC verification of the top ``K`` global candidates of every query) runs once and is
cached in ``--work`` (``inliers.npz``); every setting of the grid is then a pure re-scoring through the same
:class:`~landmarks.recognize.Recognizer` code path (``rerank_c``, ``rerank_min_inliers``, ``rerank_weight``),
so the table compares settings side by side on identical inlier counts. The first row is the no-re-ranking
baseline (same index, same out-of-domain handling).

    python bench/rerank_tune.py --index /tmp/rw-bench/index-sift-run-cpu --queries /tmp/rw-bench/queries \\
        --solution /tmp/rw-bench/recognition_solution.csv --work /tmp/rw-tune/sift-cpu

Tuning and scoring on the same queries flatters the best setting: prefer settings that win across indexes
(SIFT and learned features, weak and strong global descriptors) over the single best cell.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> int:
    """Verify once, then print the grid's table (markdown) and write ``--work/grid.json``; returns 0."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, required=True, help="index folder built with --local sift|model")
    ap.add_argument("--queries", type=Path, required=True, help="query folder")
    ap.add_argument(
        "--solution", type=Path, required=True, help="recognition_solution.csv (id,landmarks,Usage)"
    )
    ap.add_argument("--work", type=Path, required=True, help="cache folder (embeddings, inlier counts)")
    ap.add_argument("--seed", type=int, default=0, help="RANSAC seed")
    ap.add_argument("--weights", default="0,0.05,0.1,0.2,0.3,0.5,1", help="bonus weights to try")
    ap.add_argument("--cs", default="10,20,35,70", help="saturation counts c to try")
    ap.add_argument("--min-inliers", default="10,15,20,30", help="min_inliers values to try")
    args = ap.parse_args(argv)

    from landmarks import extract
    from landmarks.data.collection import load_images
    from landmarks.metrics import recognition_metrics
    from landmarks.recognize import RecognizeConfig, Recognizer
    from landmarks.submission import read_recognition_solution

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    sol = read_recognition_solution(args.solution)
    rec = Recognizer.load(args.index, RecognizeConfig(rerank="local", seed=args.seed), device="cpu")
    records = load_images([args.queries])
    res = extract.extract_resumable(rec.embedder, records, work / "queries", rec.extract_conf)
    done = [records[i] for i in res.rows]
    paths = [r.path for r in done]
    cache = work / "inliers.npz"
    real_inliers = rec.local.inliers
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        counts = [list(map(int, row[row >= -1][: int(n)])) for row, n in zip(z["counts"], z["n"])]
        verify_s = float(z["seconds"])
    else:
        got: list[list[int]] = []

        def record(queries: Any, cand_ids: Any) -> Any:
            out = real_inliers(queries, cand_ids)
            got.extend([list(map(int, c)) for c in out])
            return out

        rec.local.inliers = record
        t = time.perf_counter()
        rec.recognize_embeddings(res.embeddings, queries=paths)
        verify_s = time.perf_counter() - t
        width = max((len(c) for c in got), default=0)
        arr = np.full((len(got), width), -2, np.int64)
        for i, c in enumerate(got):
            arr[i, : len(c)] = c
        np.savez(cache, counts=arr, n=np.array([len(c) for c in got]), seconds=verify_s)
        counts = got
    order = {str(p): i for i, p in enumerate(paths)}
    rec.local.inliers = lambda queries, cand_ids: [counts[order[str(q)]] for q in queries]

    def score(conf: RecognizeConfig, rerank: bool) -> dict[str, float]:
        rec.conf = conf
        local = rec.local
        if not rerank:
            rec.local = None
        try:
            out = rec.recognize_embeddings(res.embeddings, queries=paths)
        finally:
            rec.local = local
        pred = {r.id: ((str(x.landmark), x.confidence) if x.landmark else None) for r, x in zip(done, out)}
        m = recognition_metrics(pred, sol.truth)
        return {"gap": m["gap"], "gap_lq": m["gap_ignore_non_landmarks"], "top1": m["top1_accuracy"]}

    rows: list[dict[str, Any]] = [
        {"setting": "no re-ranking", **score(RecognizeConfig(seed=args.seed), False)}
    ]
    floats = [float(x) for x in args.weights.split(",")]
    for w in floats:
        for c in [float(x) for x in args.cs.split(",")]:
            for m in [int(x) for x in args.min_inliers.split(",")]:
                conf = RecognizeConfig(
                    rerank="local", seed=args.seed, rerank_c=c, rerank_min_inliers=m, rerank_weight=w
                )
                rows.append(
                    {
                        "setting": f"w={w:g} c={c:g} min={m}",
                        "weight": w,
                        "c": c,
                        "min_inliers": m,
                        **score(conf, True),
                    }
                )
    (work / "grid.json").write_text(
        json.dumps({"index": str(args.index), "verify_s": verify_s, "rows": rows}, indent=1), encoding="utf-8"
    )
    best = sorted(rows[1:], key=lambda r: -r["gap"])[:10]
    print(f"index {args.index.name}: verification of {len(paths)} queries {verify_s:.0f} s (cached after)")
    print("| setting | GAP | GAP (landmark q.) | top-1 |\n|---|---:|---:|---:|")
    for r in [rows[0], *[r for r in rows if r.get("setting") == "w=1 c=70 min=10"], *best]:
        print(f"| {r['setting']} | {100 * r['gap']:.2f} | {100 * r['gap_lq']:.2f} | {100 * r['top1']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
