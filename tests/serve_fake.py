"""A deterministic fake recognizer and a launcher serving it, for the HTTP and page tests.

Run as ``python tests/serve_fake.py --port P --images DIR [...]``: writes three small index images to
DIR and serves :class:`FakeRecognizer` with :func:`landmarks.serve.serve` (a real uvicorn process).

The fake answers by colour, so every answer can be predicted by the tests:
- the landmark is the dominant channel of the mean colour (``tower-red``, ``bridge-green``,
  ``gate-blue``); a grey image (channels within 20 of each other) is "no landmark";
- neighbours are all index images, nearest mean colour first, score = 1 - distance / 442;
  the first neighbour has ``inliers`` 42 (verified), the others None;
- a query of exactly SLOW_SIZE (w, h) sleeps ``--slow-s`` seconds; one of BUG_SIZE raises RuntimeError
  (sizes survive any encoding, lossy or not).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from landmarks.data.collection import ImageRecord
from landmarks.data.decode import decode_image
from landmarks.recognize import RecognizerInfo

SLOW_SIZE = (37, 29)
BUG_SIZE = (41, 31)
COLOURS = {"tower-red": (200, 40, 30), "bridge-green": (40, 180, 60), "gate-blue": (30, 50, 210)}


@dataclass
class Neighbour:
    id: str
    landmark: str
    score: float
    inliers: int | None
    path: str | None


@dataclass
class Recognition:
    landmark: str | None
    confidence: float
    is_landmark: bool
    neighbours: list[Neighbour] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)


def landmark_of(rgb: Sequence[float]) -> str | None:
    """The fake's answer for a mean colour."""
    if max(rgb) - min(rgb) < 20:
        return None
    return ["tower-red", "bridge-green", "gate-blue"][int(np.argmax(rgb))]


def make_image(colour: Sequence[int], size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A ``(h, w, 3)`` uint8 image of ``colour`` with a light texture; ``size`` is (w, h)."""
    w, h = size
    rng = np.random.default_rng(sum(colour))
    return np.clip(np.asarray(colour, np.int16)[None, None] + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(
        np.uint8
    )


def scan_bomb(width: int, height: int, repeats: int) -> bytes:
    """A progressive JPEG of a flat image whose last scan is repeated ``repeats`` times (tiny, slow to decode:
    2000 x 2000 with 2,000 repeats is 52 KB and decodes in ~8 s; 6000 x 6000 in ~65 s)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 130, 140)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data[data.rfind(b"\xff\xda") : -2]
    return data[:-2] + last * repeats + b"\xff\xd9"


class FakeRecognizer:
    """Implements ``landmarks.serve.RecognizerProtocol`` deterministically (see the module docstring)."""

    def __init__(self, image_dir: Path, slow_s: float = 2.0):
        from PIL import Image

        self.slow_s = slow_s
        self.generation = 1
        self.db: list[tuple[str, str, np.ndarray, Path]] = []  # id, landmark, mean colour, path
        self._lock = threading.Lock()
        image_dir.mkdir(parents=True, exist_ok=True)
        for i, (landmark, colour) in enumerate(COLOURS.items()):
            path = image_dir / f"{landmark}.jpg"
            img = make_image(colour, (64, 48))
            Image.fromarray(img).save(path, quality=95)
            self.db.append((f"{landmark}/{i:04d}", landmark, img.reshape(-1, 3).mean(0), path))

    def recognize(self, images: Sequence[np.ndarray], ids: Sequence[str] | None = None) -> list[Recognition]:
        out = []
        for img in images:
            t0 = time.perf_counter()
            size = (img.shape[1], img.shape[0])
            if size == SLOW_SIZE:
                time.sleep(self.slow_s)
            if size == BUG_SIZE:
                raise RuntimeError("fake recognizer bug")
            mean = img.reshape(-1, 3).astype(np.float64).mean(0)
            landmark = landmark_of(mean)
            with self._lock:
                db = list(self.db)
            dists = [float(np.linalg.norm(mean - m)) for _, _, m, _ in db]
            order = np.argsort(dists, kind="stable")
            neighbours = [
                Neighbour(
                    db[j][0],
                    db[j][1],
                    round(1.0 - dists[j] / 442.0, 6),
                    42 if r == 0 else None,
                    str(db[j][3]),
                )
                for r, j in enumerate(order)
            ]
            confidence = 0.0 if landmark is None else round(float(mean.max() / max(1.0, mean.sum())), 6)
            out.append(
                Recognition(
                    landmark,
                    confidence,
                    landmark is not None,
                    neighbours,
                    {"embed": 1000 * (time.perf_counter() - t0), "search": 0.01},
                )
            )
        return out

    def add(
        self,
        records: Sequence[ImageRecord],
        *,
        num_workers: int | None = None,
        wait_s: float = 0.0,
        command: str = "add",
        swap: bool = True,
        show_progress: bool = True,
    ) -> AddResult:
        from landmarks.maintenance import IndexConflictError

        new = []
        for r in records:
            img = decode_image(r.path)
            new.append((r.id, str(r.landmark), img.reshape(-1, 3).astype(np.float64).mean(0), Path(r.path)))
        with self._lock:
            known = {d[0]: d[1] for d in self.db}
            conflicts = [(n[0], known[n[0]], n[1]) for n in new if n[0] in known and known[n[0]] != n[1]]
            if conflicts:
                raise IndexConflictError(conflicts)
            fresh = [n for n in new if n[0] not in known]
            self.db.extend(fresh)
            self.generation += 1
        return AddResult([n[0] for n in fresh], [n[0] for n in new if n[0] in known], None)

    def load_newer(self) -> None:
        return None

    def replace_index(self, index: object) -> bool:
        return False

    def pair_verification(self, query: np.ndarray, image_id: str, image: np.ndarray) -> tuple:
        from landmarks.rerank import PairVerifier

        v = PairVerifier.for_index(None)  # an index without local features: default SIFT
        fa, fb = v.features(query), v.features(image)
        return fa, fb, v.verify(fa, fb)

    def info(self) -> RecognizerInfo:
        from landmarks.index import IndexInfo

        with self._lock:
            n, lms = len(self.db), len({d[1] for d in self.db})
        index = IndexInfo(
            path=None,
            size=n,
            landmarks=lms,
            non_landmarks=0,
            type="flat",
            embedding_dim=3,
            dtype="float32",
            index_bytes=0,
            model_fingerprint="0" * 16,
            model_name="fake-colour",
            views={},
            created=None,
            updated=None,
            generation=self.generation,
            local_features=None,
        )
        return RecognizerInfo(index=index, recognize={}, ood_active=False)


@dataclass
class AddResult:
    added: list[str]
    known: list[str]
    index: object


def main(argv: list[str] | None = None) -> int:
    from landmarks.cli import setup_logging
    from landmarks.serve import ServeConfig, serve

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--queue", type=int, default=4)
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument("--slow-s", type=float, default=2.0)
    p.add_argument("--max-upload-mb", type=float, default=1.0)
    p.add_argument("--max-pixels", type=int, default=4_000_000)
    p.add_argument("--token", default=None)
    p.add_argument("--upload-dir", default=None)
    p.add_argument("--max-jpeg-scans", type=int, default=100)
    p.add_argument("--header-timeout-s", type=float, default=10.0)
    p.add_argument("--body-timeout-s", type=float, default=30.0)
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--max-inflight-upload-mb", type=float, default=256.0)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(verbose=args.verbose)
    conf = ServeConfig(
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        queue_size=args.queue,
        timeout_s=args.timeout_s,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        token=args.token,
        upload_dir=args.upload_dir,
        graceful_timeout_s=3.0,
        max_jpeg_scans=args.max_jpeg_scans,
        header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s,
        max_connections=args.max_connections,
        max_inflight_upload_mb=args.max_inflight_upload_mb,
    )
    serve(FakeRecognizer(args.images, slow_s=args.slow_s), conf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --------------------------------------------------------------------------------------------------
# Test helpers: run the launcher (or `python -m landmarks serve`) as a real uvicorn process
# --------------------------------------------------------------------------------------------------


@dataclass
class RunningServer:
    """A server subprocess: its base ``url`` (no trailing slash), process and log file."""

    url: str
    proc: Any
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_server(
    cmd: list[str],
    log_path: Path,
    port: int | None = None,
    timeout_s: float = 60.0,
) -> Iterator[RunningServer]:
    """Start ``cmd``, wait for /healthz, always stop it (SIGTERM, then kill).

    ``port``: where ``cmd`` listens; None: ``cmd`` listens on port 0 (a free port chosen by the kernel,
    no race with other tests) and the URL is read from its "serving on" log line.
    """
    import re
    import subprocess

    import httpx

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}" if port else ""
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}"
                )
            if not url and (
                m := re.search(r"serving on (http://127\.0\.0\.1:\d+)/", log_path.read_text(errors="replace"))
            ):
                url = m.group(1)
            try:
                if url and httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not healthy after {timeout_s}s:\n{log_path.read_text(errors='replace')}"
                )
            time.sleep(0.1)
        yield RunningServer(url, proc, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def fake_server(tmp: Path, *args: str) -> Iterator[RunningServer]:
    """Serve :class:`FakeRecognizer` (index images written under ``tmp``) with extra launcher ``args``."""
    import sys

    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--port",
        "0",
        "--images",
        str(tmp / "index-images"),
        *args,
    ]
    n = len(list(tmp.glob("server-*.log")))
    with run_server(cmd, tmp / f"server-{n}.log") as server:
        yield server


def build_tiny_index(root: Path, landmarks: int = 3, per_landmark: int = 3) -> Path:
    """A real index of ``landmarks x per_landmark`` synthetic JPEGs under ``root``, built with the library's
    Python API (a random-init ``test_resnet`` LandmarkNet saved as a run, then extract + LandmarkIndex).

    Returns the index folder; the images are ``root/images/lm<i>/<j>.jpg`` (ids ``lm<i>/<j>``).
    """
    import torch
    from PIL import Image

    from landmarks import extract
    from landmarks.checkpoint import save_model
    from landmarks.config import to_dict
    from landmarks.data.collection import load_collection
    from landmarks.index import LandmarkIndex
    from landmarks.models.net import LandmarkNet, ModelConfig

    torch.manual_seed(0)
    mconf = ModelConfig(backbone="test_resnet", embedding_dim=32)
    net = LandmarkNet(mconf, landmarks, pretrained="")
    pre = {"image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    save_model(
        root / "run",
        net,
        {"config": {"model": to_dict(mconf)}, "num_classes": landmarks, "classes": {}, "preprocessing": pre},
    )
    rng = np.random.default_rng(0)
    for li in range(landmarks):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((128, 96), Image.BICUBIC), np.float32)
        for j in range(per_landmark):
            img = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
            path = root / "images" / f"lm{li}" / f"{j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path, quality=92)
    records = load_collection(root / "images")
    embedder = extract.load_embedder(root / "run")
    res = extract.extract_embeddings(
        embedder, records, root / "index" / "work", extract.ExtractConfig(batch_size=8, num_workers=0)
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
    import shutil

    shutil.rmtree(root / "index" / "work", ignore_errors=True)
    return root / "index"
