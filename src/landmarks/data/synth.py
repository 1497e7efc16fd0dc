"""A synthetic dataset with the shape and the hard properties of Google Landmarks v2.

``generate(out, SynthConfig(...))`` writes, under ``out``::

    train/<a>/<b>/<c>/<id>.jpg   index/...   test/...      images in the GLDv2 layout (16-hex-digit ids)
    nonlandmarks/<id>.jpg                                  out-of-domain examples, disjoint from the test set
    train.csv           id,url,landmark_id
    train_clean.csv     landmark_id,images                 (space-separated ids)
    index.csv           id
    test.csv            id
    recognition_solution.csv   id,landmarks,Usage          (empty landmarks = not a landmark of the set)
    retrieval_solution.csv     id,images,Usage             (landmark queries only: the index ids of their landmark)
    synth.json          parameters, seed and statistics

The hard properties (see :mod:`landmarks.data.synth_render` for the pictures):

- a long tail: about 38% of landmarks have <= 5 training images, 57% <= 10, a few have hundreds
  (:func:`sample_class_counts`, stratified so the proportions hold at any number of landmarks);
- large intra-class variation: every image is a new camera (viewpoint, distance, zoom and partial
  views, roll), weather and sun, occluders, blur, noise and JPEG quality, over a 3-D scene;
- one shared "building" palette, so colour alone does not tell landmarks apart;
- a test set where ``ood_fraction`` of the queries show no landmark of the set (near-miss buildings,
  nature, textures, people, rooms), and ``nonlandmarks/`` with more images of those kinds.

Determinism: every image is a pure function of ``(seed, split, position in the split)`` and of its
landmark's scene, a pure function of ``(seed, landmark number)``; the number of workers does not change
a byte. Plans for different splits draw from separate streams, so e.g. changing ``n_queries`` leaves the
training images as they were. Images are written atomically and skipped when already present, CSVs and
``synth.json`` last, so a killed run followed by the same command completes the same dataset.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from landmarks import __version__
from landmarks.config import from_dict, to_dict
from landmarks.data import synth_render as render
from landmarks.data.collection import gldv2_image_path
from landmarks.data.scan import long_tail_histogram
from landmarks.errors import ConfigError, LandmarksError
from landmarks.utils.dist import cpu_count
from landmarks.utils.io import atomic_write, remove_entries, write_json
from landmarks.utils.progress import Progress

logger = logging.getLogger("landmarks")

#: Version of the generator: bumped whenever the same seed would give different pictures.
GENERATOR_VERSION = 1
#: Quantile function of training images per landmark: (cumulative share of landmarks, count), interpolated
#: log-linearly. 38% <= 5, 57% <= 10, 74% <= 20, 89% <= 50, 96.5% <= 100, the rest up to ~300.
TAIL_QUANTILES = (
    (0.0, 2.0),
    (0.38, 5.99),
    (0.57, 10.99),
    (0.74, 20.99),
    (0.89, 50.99),
    (0.965, 100.99),
    (1.0, 300.0),
)
_PARAMS_FILE = ".synth-params.json"
_OUTPUTS = (
    "train",
    "index",
    "test",
    "nonlandmarks",
    "train.csv",
    "train_clean.csv",
    "index.csv",
    "test.csv",
    "recognition_solution.csv",
    "retrieval_solution.csv",
    "synth.json",
    _PARAMS_FILE,
)
# random streams (second element of each seed sequence)
_S_LANDMARK_IDS, _S_TRAIN_COUNTS, _S_INDEX_PLAN, _S_TEST_PLAN, _S_NONLM_PLAN, _S_USAGE = range(6)
_S_SCENE, _S_IMAGE = 100, 200
_SPLIT_CODE = {"train": 0, "index": 1, "test": 2, "nonlandmarks": 3}


@dataclass
class SynthConfig:
    """Parameters of a synthetic dataset (everything that changes its bytes)."""

    seed: int = 0  # master seed: same seed and parameters -> byte-identical dataset
    n_landmarks: int = 100  # landmarks (classes); training images follow the long tail (~22 per landmark)
    n_queries: int = 1000  # test queries in total (landmark + out-of-domain)
    ood_fraction: float = 0.9  # share of test queries that show no landmark of the set, in [0, 0.99]
    size: int = 256  # long side of every image, pixels
    n_nonlandmarks: int = 500  # out-of-domain examples written to nonlandmarks/
    index_per_landmark: float = 3.0  # mean index (retrieval database) images per landmark, at least 1 each
    index_distractors: float = 0.5  # out-of-domain index images, as a fraction of the landmark index images
    public_fraction: float = 0.34  # share of test queries with Usage=Public (the rest Private)
    max_train_per_landmark: int = (
        0  # cap on training images per landmark (0: none; tests use it for tiny sets)
    )

    def validate(self) -> None:
        """Raise :class:`ConfigError` on values out of range."""
        if self.n_landmarks < 1:
            raise ConfigError(f"n_landmarks must be >= 1, got {self.n_landmarks}")
        if self.n_queries < 0 or self.n_nonlandmarks < 0:
            raise ConfigError("n_queries and n_nonlandmarks must be >= 0")
        if not 0.0 <= self.ood_fraction <= 0.99:
            raise ConfigError(f"ood_fraction must be in [0, 0.99], got {self.ood_fraction}")
        if not 32 <= self.size <= 4096:
            raise ConfigError(f"size must be in [32, 4096] pixels, got {self.size}")
        if self.index_per_landmark < 1 or self.index_distractors < 0:
            raise ConfigError("index_per_landmark must be >= 1 and index_distractors >= 0")
        if not 0.0 <= self.public_fraction <= 1.0:
            raise ConfigError(f"public_fraction must be in [0, 1], got {self.public_fraction}")
        if self.max_train_per_landmark < 0 or self.max_train_per_landmark == 1:
            raise ConfigError("max_train_per_landmark must be 0 (no cap) or >= 2")


# --------------------------------------------------------------------------------------------------
# The plan: which images exist, with which labels (cheap, in the main process)
# --------------------------------------------------------------------------------------------------


def sample_class_counts(
    n_landmarks: int, rng: np.random.Generator, quantiles: tuple[tuple[float, float], ...] = TAIL_QUANTILES
) -> np.ndarray:
    """Training images per landmark, (n_landmarks,) int64, following GLDv2's long tail.

    Stratified inverse-CDF sampling: landmark ``i`` gets quantile ``(perm[i] + U) / n``, so the share
    of landmarks below each threshold of :data:`TAIL_QUANTILES` is right even for a few landmarks.
    """
    q = np.array(quantiles, dtype=np.float64)
    u = (rng.permutation(n_landmarks) + rng.random(n_landmarks)) / n_landmarks
    counts = np.floor(np.exp(np.interp(u, q[:, 0], np.log(q[:, 1]))))
    return np.maximum(counts, 1).astype(np.int64)


def image_id(seed: int, split: str, k: int) -> str:
    """The 16-hex-digit id of image ``k`` of ``split`` (GLDv2 style), a hash of (seed, split, k)."""
    return hashlib.blake2b(f"landmarks-synth/{seed}/{split}/{k}".encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Job:
    """One image to render: where, what (``kind`` = ``landmark`` or an out-of-domain kind) and its seed."""

    path: str
    split: str
    k: int
    kind: str
    landmark: int  # landmark number (0..n_landmarks-1), -1 for out-of-domain images


@dataclass
class Plan:
    """Everything but the pixels."""

    landmark_ids: list[str]
    train_counts: np.ndarray
    index_counts: np.ndarray
    jobs: list[Job]
    ids: dict[tuple[str, int], str]
    test_landmark: dict[str, str | None]  # test id -> landmark id or None
    usage: dict[str, str]  # test id -> Public / Private
    templates: list[str]


def make_plan(out: Path, conf: SynthConfig) -> Plan:
    """The dataset's images, labels and splits for ``conf`` (deterministic, no pixels)."""
    seed = conf.seed
    n = conf.n_landmarks

    def stream(s: int) -> np.random.Generator:
        return np.random.default_rng([seed, s])

    lm_numbers = stream(_S_LANDMARK_IDS).choice(200_000, size=n, replace=False) + 1
    landmark_ids = [str(int(x)) for x in lm_numbers]
    train_counts = sample_class_counts(n, stream(_S_TRAIN_COUNTS))
    if conf.max_train_per_landmark:
        train_counts = np.minimum(train_counts, conf.max_train_per_landmark)
    rng = stream(_S_INDEX_PLAN)
    rel = (train_counts / np.median(train_counts)) ** 0.25
    index_counts = np.clip(
        np.round(conf.index_per_landmark * rel * np.exp(rng.normal(0, 0.25, n))), 1, 50
    ).astype(np.int64)
    n_distract = round(conf.index_distractors * int(index_counts.sum()))
    index_ood_kinds = _ood_kinds(rng, n_distract)
    rng = stream(_S_TEST_PLAN)
    n_lq = round(conf.n_queries * (1.0 - conf.ood_fraction))
    p = np.sqrt(train_counts.astype(np.float64))
    test_lms = rng.choice(n, size=n_lq, p=p / p.sum()) if n_lq else np.zeros(0, np.int64)
    test_kinds: list[tuple[str, int]] = [("landmark", int(x)) for x in test_lms]
    test_kinds += [(k, -1) for k in _ood_kinds(rng, conf.n_queries - n_lq)]
    order = rng.permutation(len(test_kinds))
    test_kinds = [test_kinds[i] for i in order]
    nonlm_kinds = _ood_kinds(stream(_S_NONLM_PLAN), conf.n_nonlandmarks)

    jobs: list[Job] = []
    ids: dict[tuple[str, int], str] = {}

    counters = {s: 0 for s in _SPLIT_CODE}
    for split, kind, lm in (
        [("train", "landmark", i) for i in range(n) for _ in range(int(train_counts[i]))]
        + [("index", "landmark", i) for i in range(n) for _ in range(int(index_counts[i]))]
        + [("index", kind, -1) for kind in index_ood_kinds]
        + [("test", kind, lm) for kind, lm in test_kinds]
        + [("nonlandmarks", kind, -1) for kind in nonlm_kinds]
    ):
        k = counters[split]
        counters[split] += 1
        iid = image_id(seed, split, k)
        ids[(split, k)] = iid
        path = (
            out / "nonlandmarks" / f"{iid}.jpg"
            if split == "nonlandmarks"
            else gldv2_image_path(out, split, iid)
        )
        jobs.append(Job(str(path), split, k, kind, lm))
    all_ids = list(ids.values())
    if len(set(all_ids)) != len(all_ids):  # pragma: no cover (2^-64 per pair)
        raise LandmarksError("image id collision; choose another seed")
    test_landmark = {
        ids[("test", j.k)]: (landmark_ids[j.landmark] if j.landmark >= 0 else None)
        for j in jobs
        if j.split == "test"
    }
    urng = stream(_S_USAGE)
    usage = {tid: ("Public" if urng.random() < conf.public_fraction else "Private") for tid in test_landmark}
    templates = [_template_of(seed, i) for i in range(n)]
    return Plan(landmark_ids, train_counts, index_counts, jobs, ids, test_landmark, usage, templates)


def _ood_kinds(rng: np.random.Generator, n: int) -> list[str]:
    w = np.array(render.OOD_WEIGHTS)
    return [str(render.OOD_KINDS[i]) for i in rng.choice(len(w), size=n, p=w / w.sum())] if n else []


def _scene_rng(seed: int, landmark: int) -> np.random.Generator:
    return np.random.default_rng([seed, _S_SCENE, landmark])


def _template_of(seed: int, landmark: int) -> str:
    rng = _scene_rng(seed, landmark)
    return str(rng.choice(render.TEMPLATES, p=render.TEMPLATE_WEIGHTS))


# --------------------------------------------------------------------------------------------------
# Rendering (in worker processes)
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _scene(seed: int, landmark: int) -> render.Scene:
    rng = _scene_rng(seed, landmark)
    template = str(rng.choice(render.TEMPLATES, p=render.TEMPLATE_WEIGHTS))
    return render.build_landmark(rng, template)


def render_job(seed: int, size: int, job: Job) -> bytes:
    """The JPEG bytes of one planned image (pure function of ``seed``, ``size`` and ``job``)."""
    rng = np.random.default_rng([seed, _S_IMAGE, _SPLIT_CODE[job.split], job.k])
    if job.kind == "landmark":
        img = render.landmark_photo(rng, _scene(seed, job.landmark), size)
    else:
        img = render.ood_photo(rng, size, job.kind)
    quality = render.jpeg_quality(rng)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover
        raise RuntimeError(f"JPEG encoding failed for {job.path}")
    return buf.tobytes()


def _write_job(args: tuple[int, int, Job]) -> str:
    seed, size, job = args
    path = Path(job.path)
    if path.exists():
        return "skipped"
    data = render_job(seed, size, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return "written"


def _worker_init() -> None:
    cv2.setNumThreads(1)


def default_workers() -> int:
    """All CPUs this process may use (:func:`landmarks.utils.dist.cpu_count`)."""
    return cpu_count()


# --------------------------------------------------------------------------------------------------
# The dataset on disk
# --------------------------------------------------------------------------------------------------


def _prepare_out(out: Path, conf: SynthConfig, overwrite: bool) -> None:
    params = {"generator_version": GENERATOR_VERSION, "config": to_dict(conf)}
    marker = out / _PARAMS_FILE
    if out.exists() and not out.is_dir():
        raise LandmarksError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        is_synth = marker.exists() or (out / "synth.json").exists()
        if not is_synth:
            raise LandmarksError(
                f"{out}: folder is not empty and is not a synthetic dataset; choose another folder"
            )
        old = None
        try:
            old = json.loads(marker.read_text(encoding="utf-8")) if marker.exists() else None
        except (OSError, json.JSONDecodeError):
            old = None
        if old != params:
            if not overwrite:
                raise LandmarksError(
                    f"{out}: holds a synthetic dataset made with other parameters; "
                    "use --overwrite or another folder"
                )
        if overwrite or old != params:
            remove_entries(out, _OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, params)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with atomic_write(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _write_csvs(out: Path, conf: SynthConfig, plan: Plan) -> None:
    ids = plan.ids
    train = sorted(
        (ids[("train", j.k)], plan.landmark_ids[j.landmark]) for j in plan.jobs if j.split == "train"
    )
    _write_csv(
        out / "train.csv",
        ["id", "url", "landmark_id"],
        [[i, f"https://synth.landmarks.invalid/{conf.seed}/train/{i}.jpg", lm] for i, lm in train],
    )
    by_lm: dict[str, list[str]] = {}
    for i, lm in train:
        by_lm.setdefault(lm, []).append(i)
    _write_csv(
        out / "train_clean.csv",
        ["landmark_id", "images"],
        [[lm, " ".join(sorted(by_lm[lm]))] for lm in sorted(by_lm, key=int)],
    )
    index_jobs = [j for j in plan.jobs if j.split == "index"]
    _write_csv(out / "index.csv", ["id"], [[i] for i in sorted(ids[("index", j.k)] for j in index_jobs)])
    test_ids = sorted(plan.test_landmark)
    _write_csv(out / "test.csv", ["id"], [[i] for i in test_ids])
    _write_csv(
        out / "recognition_solution.csv",
        ["id", "landmarks", "Usage"],
        [[i, plan.test_landmark[i] or "", plan.usage[i]] for i in test_ids],
    )
    index_of: dict[str, list[str]] = {}
    for j in index_jobs:
        if j.landmark >= 0:
            index_of.setdefault(plan.landmark_ids[j.landmark], []).append(ids[("index", j.k)])
    _write_csv(
        out / "retrieval_solution.csv",
        ["id", "images", "Usage"],
        [
            [i, " ".join(sorted(index_of[tl])), plan.usage[i]]
            for i in test_ids
            if (tl := plan.test_landmark[i]) is not None
        ],
    )


def statistics(conf: SynthConfig, plan: Plan) -> dict[str, Any]:
    """The figures written to ``synth.json``: counts per split, the long tail, the out-of-domain share."""
    counts = plan.train_counts
    by_split: dict[str, int] = {}
    kinds: dict[str, dict[str, int]] = {}
    for j in plan.jobs:
        by_split[j.split] = by_split.get(j.split, 0) + 1
        kinds.setdefault(j.split, {})
        kinds[j.split][j.kind] = kinds[j.split].get(j.kind, 0) + 1
    n_test = len(plan.test_landmark)
    n_ood = sum(1 for v in plan.test_landmark.values() if v is None)
    templates: dict[str, int] = {}
    for t in plan.templates:
        templates[t] = templates.get(t, 0) + 1
    return {
        "landmarks": conf.n_landmarks,
        "images": {**by_split, "total": len(plan.jobs)},
        "kinds": kinds,
        "train_images_per_landmark": {
            "min": int(counts.min()),
            "median": float(np.median(counts)),
            "mean": round(float(counts.mean()), 3),
            "max": int(counts.max()),
            "share_le_5": round(float((counts <= 5).mean()), 4),
            "share_le_10": round(float((counts <= 10).mean()), 4),
            "landmarks_ge_100": int((counts >= 100).sum()),
        },
        "long_tail_histogram": long_tail_histogram(counts),
        "index_images_per_landmark": {
            "min": int(plan.index_counts.min()),
            "mean": round(float(plan.index_counts.mean()), 3),
            "max": int(plan.index_counts.max()),
        },
        "test": {
            "queries": n_test,
            "landmark_queries": n_test - n_ood,
            "out_of_domain": n_ood,
            "out_of_domain_share": round(n_ood / n_test, 4) if n_test else 0.0,
            "public": sum(1 for v in plan.usage.values() if v == "Public"),
        },
        "templates": dict(sorted(templates.items())),
    }


def generate(
    out: str | Path,
    conf: SynthConfig | None = None,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the synthetic dataset for ``conf`` under ``out``; returns the ``synth.json`` content.

    ``workers``: processes (default: all CPUs; 1 renders in this process). Images already present
    are kept (a re-run completes a killed one); ``overwrite`` starts afresh, also when ``out`` holds a
    dataset made with other parameters (otherwise an error).
    """
    conf = conf or SynthConfig()
    conf.validate()
    out = Path(out)
    t0 = time.perf_counter()
    _prepare_out(out, conf, overwrite)
    plan = make_plan(out, conf)
    for split in _SPLIT_CODE:  # temporary files of a killed run
        if (out / split).is_dir():
            for tmp in (out / split).rglob(".*.tmp"):
                tmp.unlink()
    # group by landmark so that each worker builds few scenes; out-of-domain images last
    todo = sorted(plan.jobs, key=lambda j: (j.landmark < 0, j.landmark, _SPLIT_CODE[j.split], j.k))
    todo = [j for j in todo if not Path(j.path).exists()]
    n_workers = max(1, workers if workers is not None else default_workers())
    stats = statistics(conf, plan)
    logger.info(
        "synth: %d landmarks, %d images (%d to render) in %s with %d worker(s)",
        conf.n_landmarks,
        len(plan.jobs),
        len(todo),
        out,
        n_workers,
    )
    bar = Progress(len(plan.jobs), "synth", "img", disable=not progress)
    bar.update(len(plan.jobs) - len(todo))
    args = [(conf.seed, conf.size, j) for j in todo]
    if n_workers == 1 or len(todo) < 16:
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            for a in args:
                _write_job(a)
                bar.update(1)
        finally:
            cv2.setNumThreads(threads)
            _scene.cache_clear()
    else:
        chunk = max(1, min(16, len(args) // (n_workers * 8)))
        ctx = mp.get_context("spawn")
        with ctx.Pool(n_workers, initializer=_worker_init) as pool:
            for _ in pool.imap_unordered(_write_job, args, chunksize=chunk):
                bar.update(1)
    bar.close()
    _write_csvs(out, conf, plan)
    info = {
        "generator": "landmarks.data.synth",
        "generator_version": GENERATOR_VERSION,
        "landmarks_version": __version__,
        "config": to_dict(conf),
        "statistics": stats,
    }
    write_json(out / "synth.json", info)
    logger.info("synth: done in %.1f s (%s)", time.perf_counter() - t0, out)
    return info


def load_config(data: dict[str, Any]) -> SynthConfig:
    """A :class:`SynthConfig` from a dict (strict: unknown keys are errors)."""
    conf = from_dict(SynthConfig, data)
    conf.validate()
    return conf


__all__ = [
    "TAIL_QUANTILES",
    "Job",
    "Plan",
    "SynthConfig",
    "generate",
    "image_id",
    "load_config",
    "long_tail_histogram",
    "make_plan",
    "render_job",
    "sample_class_counts",
    "statistics",
]
