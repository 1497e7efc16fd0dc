"""Benchmark: the HTTP service against calling the library in-process, at several concurrencies.

Both sides do the same work per request: decode the JPEG bytes of a query photo
(``landmarks.data.decode.decode_image``) and ``Recognizer.recognize([img])`` on the same index, with the
same number of recognition workers (``--workers``; in-process a ``ThreadPoolExecutor`` of that size,
like the server's pool) and the same torch threads per worker. The HTTP side adds the client, loopback TCP,
uvicorn/FastAPI, the bounded body read, the worker-pool hand-off and JSON. For each concurrency C a
bounded load generator (C threads, ``--requests`` requests or ``--max-seconds``, whichever comes
first; a keep-alive raw-socket HTTP/1.1 client per thread, cheap on CPU) measures p50/p99 latency and throughput; the ratios
HTTP / in-process are the service's overhead.

Index: ``--index INDEX`` (with the model it records), else a small one is built in a temporary folder:
a random-init ``--backbone`` LandmarkNet at ``--image-size`` over ``--per-landmark`` photos of each
landmarks13_web class of ``--data`` (``<repo>/../shared/data/realworld``; synthetic photos when absent).
Queries are other photos of the same classes (or synthetic ones).

    .venv/bin/python bench/serve.py [--index INDEX] [--concurrency 1,8,32] [--out bench/results/serve.md]

Note: the load generator runs on the same machine as the server; on a small machine the client
threads take CPU from the server, which counts against the HTTP side.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "realworld"


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def synthetic_photos(n: int, seed: int, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    """``n`` smooth random colour JPEGs of ``size`` (w, h)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        arr = np.clip(np.asarray(img, np.float32) + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255).astype(
            np.uint8
        )
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def realworld_split(
    data: Path, per_landmark: int, queries: int
) -> tuple[list[tuple[Path, str]], list[Path]] | None:
    """(index photos (path, landmark), query photos) from landmarks13_web, or None without the data."""
    table = data / "landmarks.csv"
    if not table.is_file():
        return None
    by_class: dict[str, list[Path]] = {}
    with open(table, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["collection"] == "landmarks13_web":
                by_class.setdefault(row["landmark"], []).append(data / row["path"])
    index, rest = [], []
    for name in sorted(by_class):
        paths = sorted(by_class[name])
        index += [(p, name) for p in paths[:per_landmark]]
        rest += paths[per_landmark : per_landmark + max(1, queries // len(by_class) + 1)]
    return index, rest[:queries]


def build_index(
    root: Path, backbone: str, image_size: int, embedding_dim: int, photos: Sequence[tuple[bytes, str]]
) -> Path:
    """A random-init model run and an index of ``photos`` (JPEG bytes, landmark) under ``root``."""
    import torch

    from landmarks import extract
    from landmarks.checkpoint import save_model
    from landmarks.config import to_dict
    from landmarks.data.collection import load_collection
    from landmarks.index import LandmarkIndex
    from landmarks.models.net import LandmarkNet, ModelConfig

    torch.manual_seed(0)
    landmarks = sorted({lm for _, lm in photos})
    mconf = ModelConfig(backbone=backbone, embedding_dim=embedding_dim)
    net = LandmarkNet(mconf, len(landmarks), pretrained="")
    pre = {"image_size": image_size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    save_model(
        root / "run",
        net,
        {
            "config": {"model": to_dict(mconf)},
            "num_classes": len(landmarks),
            "classes": {},
            "preprocessing": pre,
        },
    )
    counts: dict[str, int] = {}
    for data, lm in photos:
        i = counts[lm] = counts.get(lm, 0) + 1
        path = root / "images" / lm / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    records = load_collection(root / "images")
    embedder = extract.load_embedder(root / "run")
    res = extract.extract_embeddings(
        embedder, records, root / "index" / "work", extract.ExtractConfig(batch_size=16, num_workers=0)
    )
    kept = [records[i] for i in res.rows]
    index = LandmarkIndex.build(
        res.embeddings,
        res.ids,
        [str(r.landmark) for r in kept],
        paths=[str(Path(r.path).absolute()) for r in kept],
        model=embedder.describe(),
    )
    index.save(root / "index")
    return root / "index"


# --------------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------------


def run_load(
    concurrency: int, requests: int, max_seconds: float, call: Callable[[int], None]
) -> dict[str, float]:
    """``concurrency`` threads call ``call(i)`` for i = 0, 1, ... until ``requests`` calls or ``max_seconds``.

    Returns p50/p99 latency (ms), throughput (completed calls / wall seconds), completed and errors.
    """
    lock = threading.Lock()
    state = {"next": 0, "errors": 0}
    latencies: list[float] = []
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= requests or time.perf_counter() > deadline:
                    return
                state["next"] = i + 1
            t0 = time.perf_counter()
            try:
                call(i)
            except Exception as e:  # counted, reported
                with lock:
                    state["errors"] += 1
                    if state["errors"] <= 3:
                        print(f"  request {i} failed: {e}", file=sys.stderr)
                continue
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000.0
    return {
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "rps": len(lat) / wall if wall > 0 else 0.0,
        "completed": float(len(lat)),
        "errors": float(state["errors"]),
    }


class RawClient:
    """A minimal keep-alive HTTP/1.1 client on one socket (cheap on CPU, so the load generator takes
    as little as possible from the server on a small machine). Reconnects when the server closes."""

    def __init__(self, port: int):
        self.port = port
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=120)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        """POST ``body``; returns (status, response body)."""
        if self.sock is None:
            self.sock = self._connect()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock = self.sock
        sock.sendall(head + body)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        header, rest = buf.split(b"\r\n\r\n", 1)
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = int(fields.get("content-length", "0"))
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            rest += chunk
        if fields.get("connection", "").lower() == "close":
            sock.close()
            self.sock = None
        return status, rest[:n]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--index", type=Path, default=None, help="an existing index folder (default: build a small one)"
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="real photos (default %(default)s)")
    p.add_argument("--backbone", default="efficientnet_b0", help="random-init backbone of the built index")
    p.add_argument("--image-size", type=int, default=224, help="input size of the built index's model")
    p.add_argument("--embedding-dim", type=int, default=512)
    p.add_argument("--per-landmark", type=int, default=8, help="index photos per landmark when building")
    p.add_argument("--queries", type=int, default=32, help="distinct query photos")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    p.add_argument("--requests", type=int, default=160, help="requests per level (bound)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time per level (bound)")
    p.add_argument("--workers", type=int, default=2, help="recognition workers (server and in-process)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.md")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]

    import httpx
    import torch

    from landmarks.data.decode import decode_image
    from landmarks.recognize import Recognizer
    from landmarks.utils.io import atomic_write

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    source = "synthetic 640x480 JPEGs"
    if args.index is None:
        split = realworld_split(args.data, args.per_landmark, args.queries)
        if split is not None:
            index_photos = [(path.read_bytes(), lm) for path, lm in split[0]]
            queries = [path.read_bytes() for path in split[1]]
            source = f"landmarks13_web photos from {os.path.relpath(Path(args.data).absolute(), REPO)}"
        else:
            synth = synthetic_photos(13 * args.per_landmark + args.queries, seed=0)
            index_photos = [(b, f"lm{i % 13}") for i, b in enumerate(synth[: 13 * args.per_landmark])]
            queries = synth[13 * args.per_landmark :]
        t0 = time.perf_counter()
        index_dir = build_index(
            Path(tmp.name), args.backbone, args.image_size, args.embedding_dim, index_photos
        )
        print(
            f"built an index of {len(index_photos)} photos ({args.backbone} @ {args.image_size}, random init) "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        model_desc = f"{args.backbone} @ {args.image_size}px, random init, D={args.embedding_dim}"
    else:
        index_dir = args.index
        split = realworld_split(args.data, 0, args.queries)
        queries = (
            [path.read_bytes() for path in split[1]] if split else synthetic_photos(args.queries, seed=1)
        )
        source = (
            f"landmarks13_web photos from {os.path.relpath(Path(args.data).absolute(), REPO)}"
            if split
            else source
        )
        model_desc = "the index's model"

    threads_per_worker = max(1, (os.cpu_count() or 1) // args.workers)
    rows: list[tuple[int, dict[str, float], dict[str, float]]] = []

    # -- in-process ------------------------------------------------------------------------------
    torch.set_num_threads(threads_per_worker)
    rec = Recognizer.load(index_dir)
    size = rec.info().index.size
    # Like the server: decoding and recognition run in a FIFO pool of N worker threads.
    pool = ThreadPoolExecutor(max_workers=args.workers)

    def work(i: int) -> None:
        rec.recognize([decode_image(queries[i % len(queries)])])

    def library_call(i: int) -> None:
        pool.submit(work, i).result()

    # -- the server (idle while the in-process side runs) ---------------------------------------------
    port = free_port()
    log_path = Path(tmp.name) / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "landmarks",
        "-q",
        "serve",
        "--index",
        str(index_dir),
        "--port",
        str(port),
        "--workers",
        str(args.workers),
        "--queue",
        "256",
        "--timeout-s",
        "120",
    ]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    local = threading.local()
    clients: list[RawClient] = []

    def http_call(i: int) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = RawClient(port)
            clients.append(client)
        status, body = client.post("/v1/recognize", queries[i % len(queries)], "image/jpeg")
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")

    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.2)
        for i in range(4):  # warm-up both sides
            library_call(i)
            http_call(i)
        # Each level: in-process, then HTTP, back to back (the machine's load drifts less in between).
        for c in levels:
            a = run_load(c, args.requests, args.max_seconds, library_call)
            b = run_load(c, args.requests, args.max_seconds, http_call)
            rows.append((c, a, b))
            print(
                f"concurrency {c}: in-process p50 {a['p50_ms']:.1f} ms, HTTP p50 {b['p50_ms']:.1f} ms",
                flush=True,
            )
            for cl in clients:
                cl.close()
            clients.clear()
    finally:
        pool.shutdown()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    # -- report --------------------------------------------------------------------------------------
    import fastapi
    import uvicorn

    q_px = [decode_image(q).shape[:2] for q in queries[:8]]
    lines = [
        "# bench/serve: HTTP service vs the library in-process",
        "",
        f"Index: {size} images ({model_desc}); queries: {len(queries)} distinct {source} "
        f"(e.g. {q_px[0][1]}x{q_px[0][0]} px), JPEG bytes decoded per request on both sides. "
        f"{args.workers} recognition workers x {threads_per_worker} torch thread(s) on both sides; "
        f"up to {args.requests} requests or {args.max_seconds:g} s per level; one keep-alive raw-socket "
        "HTTP/1.1 client per client thread, image/jpeg bodies on loopback.",
        f"CPU: {platform.machine()}, {os.cpu_count()} cores (client and server share them); torch "
        f"{torch.__version__}, FastAPI {fastapi.__version__}, uvicorn {uvicorn.__version__}.",
        "",
        "| concurrency | in-process p50 / p99 (ms) | in-process req/s | HTTP p50 / p99 (ms) | HTTP req/s "
        "| p50 ratio | throughput ratio | HTTP errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, a, b in rows:
        lines.append(
            f"| {c} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | {a['rps']:.1f} | {b['p50_ms']:.1f} / "
            f"{b['p99_ms']:.1f} | {b['rps']:.1f} | {b['p50_ms'] / a['p50_ms']:.2f}x | "
            f"{b['rps'] / a['rps']:.2f}x | {int(b['errors'])} |"
        )
    c1 = rows[0]
    lines += [
        "",
        f"At concurrency {c1[0]} the service adds {c1[2]['p50_ms'] - c1[1]['p50_ms']:.1f} ms to the median "
        f"request ({c1[2]['p50_ms'] / c1[1]['p50_ms']:.2f}x the in-process latency).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_write(args.out) as f:
        f.write(text)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
