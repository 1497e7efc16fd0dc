"""Benchmark: ``landmarks index`` from JPEG files on disk against the bare model forward on decoded tensors.

Both sides use the same model, input size, batch size and torch threads:

- ``index``: the whole ``landmarks index`` command run in this process (list the images, decode and
  preprocess in DataLoader workers, forward in ``inference_mode`` on channels-last tensors, chunked
  atomic writes, FAISS build and save); images/s = images / wall time of the command. The extraction
  stage alone is also timed (``extract_embeddings``, no model loading, no index build).
- ``bare forward``: the images decoded and preprocessed beforehand into tensors; only
  ``model.embed(batch)`` is timed (inference_mode, channels-last).
- ``timm forward``: the same tensors through the timm model alone (``forward_features``: no GeM, no
  neck, no normalisation), the floor of any pipeline built on that backbone.

Best of ``--repeats``, alternating. Goal: index / bare forward >= 0.8.

Images: ``--images`` (a labelled list or folder), else the landmark photos of ``--data``
(``<repo>/../shared/data/realworld/landmarks.csv``, 793 JPEGs up to 1024 px) through a list file in a
temporary folder (the photos are not copied), else ``--synthetic`` smooth random 800x600 JPEGs.
Model: ``--model RUN``; else ``--pretrained lite0`` (``landmarks init``: the package's ImageNet
EfficientNet-Lite0 + GeM, no neck, at ``--image-size``); else a random-init LandmarkNet (``--backbone``,
``--image-size``, 512-d) saved to a temporary run.

    .venv/bin/python bench/extract.py [--backbone mobilenetv3_large_100 --image-size 128] [--batch-size 32]
    .venv/bin/python bench/extract.py --pretrained lite0 --image-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "realworld"


def make_run(path: Path, backbone: str, image_size: int) -> Path:
    """A random-init LandmarkNet run folder."""
    import torch

    from landmarks.checkpoint import save_model
    from landmarks.config import to_dict
    from landmarks.data.transforms import Preprocess
    from landmarks.models.net import LandmarkNet, ModelConfig

    torch.manual_seed(0)
    conf = ModelConfig(backbone=backbone, embedding_dim=512)
    net = LandmarkNet(conf, num_classes=16, pretrained="")
    save_model(
        path,
        net,
        {
            "config": {"model": to_dict(conf)},
            "classes": {},
            "num_classes": 16,
            "preprocessing": Preprocess(image_size).to_dict(),
        },
    )
    return path


def image_list(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """A labelled list file of the benchmark images and a description."""
    if args.images:
        return Path(args.images), str(args.images)
    lines = []
    csv_path = Path(args.data) / "landmarks.csv"
    if csv_path.is_file() and not args.synthetic:
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                if row["path"].lower().endswith((".jpg", ".jpeg")):
                    lines.append(f"{(Path(args.data) / row['path']).absolute()}\t{row['landmark']}")
        shown = os.path.relpath(csv_path.absolute(), REPO)  # ../shared/..., never a machine path
        what = f"{len(lines)} JPEG landmark photos of `{shown}` (up to 1024 px)"
    else:
        from PIL import Image

        rng = np.random.default_rng(0)
        n = args.synthetic or 400
        for i in range(n):
            small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            arr = np.asarray(Image.fromarray(small).resize((800, 600), Image.Resampling.BICUBIC), np.float32)
            arr = np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
            p = tmp / "img" / f"{i:05d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(p, quality=90)
            lines.append(f"{p}\tlm{i % 20}")
        what = f"{n} synthetic 800x600 JPEGs"
    lst = tmp / "images.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst, what


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--images", default=None, help="a labelled collection to index instead")
    ap.add_argument("--synthetic", type=int, default=0, help="use N synthetic JPEGs")
    ap.add_argument("--model", default=None, help="a trained run (default: random-init --backbone)")
    ap.add_argument(
        "--pretrained", default=None, help="package weights (lite0, lite1, lite2): `landmarks init` run"
    )
    ap.add_argument("--backbone", default="mobilenetv3_large_100")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--threads",
        default=None,
        help="comma-separated torch thread counts to measure (default: 1 and all cores)",
    )
    ap.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers of the index run (default: library's)"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = ap.parse_args()

    import torch

    from landmarks import extract
    from landmarks.cli import main as landmarks_main
    from landmarks.data.collection import load_collection
    from landmarks.data.decode import decode_image
    from landmarks.utils.dist import cpu_count, default_workers

    cores = cpu_count()
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    threads = thread_counts[0]
    workers = default_workers() if args.workers is None else args.workers
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        lst, what = image_list(args, tmp)
        if args.limit:
            text = lst.read_text().splitlines()[: args.limit]
            lst = tmp / "limited.txt"
            lst.write_text("\n".join(text) + "\n")
            what = f"the first {len(text)} of " + what
        if args.model:
            run = Path(args.model)
        elif args.pretrained:
            from landmarks.checkpoint import init_run

            run = tmp / "run"
            init_run(run, args.pretrained, image_size=args.image_size)
        else:
            run = make_run(tmp / "run", args.backbone, args.image_size)
        records = load_collection(lst)
        n = len(records)
        emb = extract.load_embedder(run, "cpu")
        desc = emb.describe()
        model = emb.model  # type: ignore[attr-defined]

        # bare forward on pre-decoded, preprocessed tensors
        tensors = [emb.preprocess(decode_image(r.path, min_side_px=emb.image_size)) for r in records]
        batches = [torch.stack(tensors[s : s + args.batch_size]) for s in range(0, n, args.batch_size)]

        def bare() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                for x in batches:
                    model.embed(x.contiguous(memory_format=torch.channels_last))
            return time.perf_counter() - t

        timm_model = model.backbone.model

        def timm_forward() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                for x in batches:
                    timm_model.forward_features(x.contiguous(memory_format=torch.channels_last))
            return time.perf_counter() - t

        def index_cmd(name: str, same_threads: bool) -> float:
            argv = [
                "-q",
                "index",
                "--model",
                str(run),
                "--images",
                str(lst),
                "--out",
                str(tmp / name),
                "--batch-size",
                str(args.batch_size),
                "--device",
                "cpu",
                "--workers",
                str(workers),
            ]
            if same_threads:
                argv += ["--threads", str(threads)]
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = landmarks_main(argv)
            dt = time.perf_counter() - t
            torch.set_num_threads(threads)
            if code != 0:
                raise SystemExit(f"landmarks index failed with status {code}")
            return dt

        def extraction(name: str) -> float:
            conf = extract.ExtractConfig(batch_size=args.batch_size, num_workers=workers)
            t = time.perf_counter()
            extract.extract_embeddings(emb, records, tmp / name, conf, show_progress=False)
            return time.perf_counter() - t

        results = []
        for nthreads in thread_counts:
            threads = nthreads
            torch.set_num_threads(threads)
            bare()  # warm-up (allocator, oneDNN kernels)
            t_bare = t_index = t_extract = t_timm = float("inf")
            for i in range(args.repeats):
                t_timm = min(t_timm, timm_forward())
                t_bare = min(t_bare, bare())
                t_index = min(t_index, index_cmd(f"index{threads}-{i}", True))
                t_extract = min(t_extract, extraction(f"extract{threads}-{i}"))
            results.append((threads, t_timm, t_bare, t_index, t_extract))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    say("# bench/extract: `landmarks index` from JPEG files vs the bare model forward on decoded tensors")
    say()
    say(
        f"{n} images: {what}. Model: {desc.get('model_backbone') or desc.get('name')} at {emb.image_size} px, "
        f"{emb.embedding_dim}-d; batch {args.batch_size}; the same torch threads on both sides; {workers} "
        f"DataLoader worker(s) decode for the index run; best of {args.repeats}, alternating. CPU: {platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load:.1f} at the end (shared machine)."
    )
    say()
    say(
        "| torch threads | timm `forward_features` (pre-decoded tensors) | bare forward (pre-decoded tensors, "
        "`model.embed` only) | `landmarks index` (whole command: load, decode, embed, write chunks, build, save) "
        "| index / bare | index / timm | extraction stage only | extraction / bare |"
    )
    say("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads, t_timm, t_bare, t_index, t_extract in results:
        say(
            f"| {threads} | {n / t_timm:.1f} img/s | {n / t_bare:.1f} img/s | {n / t_index:.1f} img/s | "
            f"**{t_bare / t_index:.2f}x** | **{t_timm / t_index:.2f}x** | {n / t_extract:.1f} img/s | "
            f"{t_bare / t_extract:.2f}x |"
        )
    say()
    say(
        f"`landmarks index` on CPU defaults to cores - decoding workers = {max(1, cores - workers)} "
        "torch thread(s) (`--threads` overrides it)."
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
