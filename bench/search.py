"""Benchmark: index search (landmarks.index) against raw FAISS, and the approximate presets' recall.

Data: ``--n`` x ``--d`` unit embeddings drawn around class centres like trained ArcFace embeddings,
not uniform noise: ``--n / 10`` classes with long-tailed (log-normal) sizes grouped around super-class
centres, a per-class spread, a shared direction and an anisotropic spectrum (effective dimension about
140 of 512, randomly rotated). Queries: ``--nq`` fresh draws from the same classes (landmark queries)
and ``--nq-ood`` draws from the overall distribution that belong to no class (out-of-domain queries;
recall reported separately).

Measured side by side in one run, same queries, same ``--threads``:

- exact: ``LandmarkIndex`` (``flat``) search against a raw ``faiss.IndexFlatIP`` over the same rows
  (best of ``--repeats``, alternating); goal >= 0.9x;
- ``ivfpq`` and ``hnsw``: recall@k against exact search and throughput relative to the exact search,
  for a sweep of ``nprobe`` / ``efSearch`` (the preset's default marked); goal recall@10 >= 0.95 at
  >= 10x the exact throughput;
- memory per indexed image: the FAISS index serialised (RAM) and the stored embeddings (disk).

    .venv/bin/python bench/search.py [--n 1000000] [--d 512] [--types flat,ivfpq,hnsw] [--out bench/results/search.md]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from landmarks.index import IndexConfig, LandmarkIndex, index_memory_bytes  # noqa: E402

MODEL = {"fingerprint": "bench", "name": "synthetic"}


def make_data(n: int, d: int, nq: int, nq_ood: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xb (n, d), xq (nq, d), xq_ood (nq_ood, d))`` float32 unit rows around long-tailed class centres.

    Like trained embeddings, the variance is anisotropic (spectrum ~ 1 / (1 + i/8), effective dimension
    about 140 at d = 512, randomly rotated), classes sit around "super-class" centres (similar-looking
    landmarks) and all rows share a common direction.
    """
    rng = np.random.default_rng(seed)
    scale = np.sqrt(1.0 / (1.0 + np.arange(d) / 8.0)).astype(np.float32)
    scale /= np.sqrt((scale**2).sum())
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)).astype(np.float32))
    rotation = rotation.astype(np.float32)

    def gauss(m: int) -> np.ndarray:
        return rng.standard_normal((m, d), dtype=np.float32) * scale

    n_classes = max(1, n // 10)
    shared = np.zeros(d, np.float32)
    shared[0] = 0.5
    supers = gauss(max(1, n_classes // 20))
    centres = supers[rng.integers(0, len(supers), n_classes)] + 0.8 * gauss(n_classes) + shared
    sizes = rng.lognormal(1.8, 1.0, n_classes)
    p = sizes / sizes.sum()
    spread = rng.uniform(0.5, 0.9, n_classes).astype(np.float32)

    def finish(x: np.ndarray) -> np.ndarray:
        x = x @ rotation
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, d), np.float32)
        for s in range(0, m, 100_000):
            e = min(m, s + 100_000)
            c = rng.choice(n_classes, e - s, p=p)
            x = gauss(e - s)
            x *= spread[c][:, None]
            x += centres[c]
            out[s:e] = finish(x)
        return out

    xb = draw(n)
    xq = draw(nq)
    ood = finish(1.5 * gauss(nq_ood) + shared)
    return xb, xq, ood


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / k over queries (rows of row indices)."""
    k = truth.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(found, truth)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="indexed embeddings")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--nq", type=int, default=1000, help="landmark queries")
    ap.add_argument("--nq-ood", type=int, default=200, help="out-of-domain queries (recall shown separately)")
    ap.add_argument("--nq-time", type=int, default=100, help="landmark queries timed on the exact indexes")
    ap.add_argument(
        "--exact-repeats", type=int, default=10, help="alternating timing repeats of the exact indexes"
    )
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--types", default="flat,ivfpq,hnsw")
    ap.add_argument("--threads", type=int, default=None, help="FAISS/OpenMP threads (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    ap.add_argument("--nprobe", default="32,64,128,256", help="IVF-PQ nprobe sweep")
    ap.add_argument("--ef", default="128,192,256", help="HNSW efSearch sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    threads = faiss.omp_get_max_threads()
    types = args.types.split(",")
    defaults = IndexConfig()
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    t0 = time.perf_counter()
    xb, xq, xq_ood = make_data(args.n, args.d, args.nq, args.nq_ood, args.seed)
    say(
        f"# bench/search: {args.n:,} x {args.d} clustered embeddings, {args.nq} landmark + {args.nq_ood} "
        f"out-of-domain queries, k = {args.k}"
    )
    say()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    say(
        f"CPU: {platform.machine()}, {threads} FAISS threads, load average {load:.1f} at start (a shared machine: "
        f"absolute speeds vary, ratios are measured side by side); faiss {faiss.__version__}; data made in "
        f"{time.perf_counter() - t0:.0f} s. Throughput = queries/s in batches of {args.nq} landmark queries ({args.nq_time} for "
        f"the exact indexes, alternating, best of {args.exact_repeats}), best of {args.repeats}; recall@{args.k} against exact search."
    )
    say()

    # exact: raw FAISS vs LandmarkIndex flat, alternating
    raw = faiss.IndexFlatIP(args.d)
    raw.add(xb)
    ids = [str(i) for i in range(args.n)]
    lms = ["x"] * args.n
    t = time.perf_counter()
    flat = LandmarkIndex.build(xb, ids, lms, model=MODEL, conf=IndexConfig(type="flat"))
    build_flat = time.perf_counter() - t
    # the same queries through both, alternating, best of --repeats (other processes share the CPU)
    xt = xq[: args.nq_time]
    t_raw, t_ours = float("inf"), float("inf")
    for _ in range(args.exact_repeats):
        dt, _ = timed(partial(raw.search, xt, args.k), 1)
        t_raw = min(t_raw, dt)
        dt, _ = timed(partial(flat.search, xt, args.k), 1)
        t_ours = min(t_ours, dt)
    ratio = t_raw / t_ours
    # the exact reference for the approximate indexes: raw FAISS on the whole batch of --nq queries
    t_exact, (_, truth) = timed(partial(raw.search, xq, args.k), 2)
    _, mine = flat.search(xq, args.k)
    _, truth_ood = raw.search(xq_ood, args.k)
    exact_qps = args.nq / t_exact
    flat_mem = index_memory_bytes(flat.faiss_index) / args.n
    say(
        f"| index | setting | recall@{args.k} | recall@{args.k} (OOD queries) | queries/s | vs exact | build (s) "
        "| RAM B/image | disk B/image |"
    )
    say("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    say(
        f"| raw faiss.IndexFlatIP | exact, batch of {args.nq} | 1.000 | 1.000 | {exact_qps:,.1f} | 1.00x | - "
        f"| {4 * args.d} | - |"
    )
    say(
        f"| raw faiss.IndexFlatIP | exact, batch of {len(xt)} | 1.000 | 1.000 | {len(xt) / t_raw:,.1f} | "
        f"{len(xt) / t_raw / exact_qps:.2f}x | - | {4 * args.d} | - |"
    )
    if "flat" in types:
        say(
            f"| landmarks flat | exact, batch of {len(xt)} | {recall(mine, truth):.3f} | 1.000 | {len(xt) / t_ours:,.1f} | "
            f"{len(xt) / t_ours / exact_qps:.2f}x (**{ratio:.2f}x raw, same batch**) | {build_flat:.1f} | "
            f"{flat_mem:,.0f} | {4 * args.d + 8} |"
        )
    del flat, raw
    gc.collect()

    if "ivfpq" in types:
        t = time.perf_counter()
        ivf = LandmarkIndex.build(xb, ids, lms, model=MODEL, conf=IndexConfig(type="ivfpq", dtype="float16"))
        build = time.perf_counter() - t
        mem = index_memory_bytes(ivf.faiss_index) / args.n
        nlist = faiss.extract_index_ivf(ivf.faiss_index).nlist
        pq_m = faiss.downcast_index(ivf.faiss_index).pq.M
        for nprobe in [int(v) for v in args.nprobe.split(",")]:
            for refine in sorted({1, defaults.refine_factor}):
                ivf.set_search_params(nprobe=nprobe, refine_factor=refine)
                dt, (_, found) = timed(partial(ivf.search, xq, args.k), args.repeats)
                _, found_ood = ivf.search(xq_ood, args.k)
                mark = " (default)" if nprobe == defaults.nprobe and refine == defaults.refine_factor else ""
                say(
                    f"| ivfpq nlist={nlist} m={pq_m}x4 bits | nprobe={nprobe} refine={refine}{mark} | "
                    f"{recall(found, truth):.3f} | {recall(found_ood, truth_ood):.3f} | {args.nq / dt:,.0f} | "
                    f"{args.nq / dt / exact_qps:.1f}x | {build:.0f} | {mem:,.0f} | {2 * args.d} (fp16, re-ranking) |"
                )
        del ivf
        gc.collect()

    if "hnsw" in types:
        t = time.perf_counter()
        hnsw = LandmarkIndex.build(xb, ids, lms, model=MODEL, conf=IndexConfig(type="hnsw"))
        build = time.perf_counter() - t
        mem = index_memory_bytes(hnsw.faiss_index) / args.n
        for ef in [int(v) for v in args.ef.split(",")]:
            hnsw.set_search_params(ef_search=ef)
            dt, (_, found) = timed(partial(hnsw.search, xq, args.k), args.repeats)
            _, found_ood = hnsw.search(xq_ood, args.k)
            mark = " (default)" if ef == defaults.ef_search else ""
            say(
                f"| hnsw M={defaults.hnsw_m} efC={defaults.ef_construction} | efSearch={ef}{mark} | "
                f"{recall(found, truth):.3f} | {recall(found_ood, truth_ood):.3f} | {args.nq / dt:,.0f} | "
                f"{args.nq / dt / exact_qps:.1f}x | {build:.0f} | {mem:,.0f} | {4 * args.d} |"
            )
        del hnsw
    say()
    say(f"Total {time.perf_counter() - t0:.0f} s.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
