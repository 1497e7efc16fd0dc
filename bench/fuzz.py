"""Fuzz: mutated JPEGs through the code paths of ``match``, ``recognize`` and the service; count escapes.

Each case is a small seed JPEG (baseline, progressive, greyscale, with EXIF, with an EXIF thumbnail, MPO-like)
mutated deterministically (byte flips, truncation, inserted or repeated runs, length fields) and fed to:

- ``match``: ``decode_image`` of the file, then RootSIFT (what ``landmarks match`` does before matching);
- ``recognize``: the extraction dataset's item loader (decode + preprocess, the DataLoader path of
  ``landmarks index/recognize``), on the bytes written to a file;
- ``service``: ``image_info`` + the service's decode (``_Service.decode``, in-thread), as an upload.

An **escape** is any exception other than the typed refusal of that path (``ImageDecodeError`` for
``match``; a ``(i, None, reason)`` item for ``recognize``; ``ImageDecodeError`` or an ``ApiError`` below 500
for the service). Cheap on CPU (32-64 px images); run it niced:

    nice .venv/bin/python bench/fuzz.py --cases 100000 [--seconds 900] [--out bench/results/fuzz.json]

``--http N`` also sends N of the cases to a running ``landmarks serve`` (decoder processes) and counts 5xx.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def seeds() -> list[bytes]:
    """Small valid JPEGs of several kinds."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    out = []
    for kw in ({}, {"progressive": True}, {"quality": 40, "subsampling": 2}):
        buf = io.BytesIO()
        img.save(buf, "JPEG", **kw)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    img.convert("L").save(buf, "JPEG", progressive=True)
    out.append(buf.getvalue())
    ex = Image.Exif()
    ex[0x0112] = 6
    ex[0x010F] = "Cam"
    ex[0x0132] = "2024:01:01 00:00:00"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=ex.tobytes())
    out.append(buf.getvalue())
    buf = io.BytesIO()
    img.save(buf, "MPO", save_all=True, append_images=[img.rotate(90)])
    out.append(buf.getvalue())
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One deterministic mutation of ``data``."""
    d = bytearray(data)
    op = rng.randrange(7)
    if op == 0:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            d[rng.randrange(2, len(d))] = rng.randrange(256)
    elif op == 1:  # truncate
        d = d[: rng.randrange(2, len(d))]
    elif op == 2:  # insert random bytes
        p = rng.randrange(2, len(d))
        d[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == 3:  # repeat a run
        a = rng.randrange(2, len(d))
        b = min(len(d), a + rng.randint(1, 200))
        d[b:b] = d[a:b] * rng.randint(1, 20)
    elif op == 4:  # corrupt a segment length field
        marks = [i for i in range(2, len(d) - 3) if d[i] == 0xFF and 0xC0 <= d[i + 1] <= 0xFE]
        if marks:
            i = rng.choice(marks)
            d[i + 2], d[i + 3] = rng.randrange(256), rng.randrange(256)
    elif op == 5:  # early header: flip bytes within the first 200 (EXIF, tables, frame header)
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(2, min(len(d), 200))] = rng.randrange(256)
    else:  # delete a run
        a = rng.randrange(2, len(d))
        del d[a : a + rng.randint(1, 100)]
    return bytes(d)


class Paths:
    """The three code paths, each returning None (handled) or raising (an escape)."""

    def __init__(self, tmp: Path):
        from landmarks.data.collection import ImageRecord
        from landmarks.data.transforms import Preprocess
        from landmarks.extract import _ImageDataset
        from landmarks.local_features import SiftExtractor
        from landmarks.serve import ServeConfig, _Service

        self.tmp = tmp
        self.sift = SiftExtractor()
        self.file = tmp / "case.jpg"
        self.dataset = _ImageDataset(
            [ImageRecord("case", self.file, None)], Preprocess(64), None, 100_000_000
        )
        self.svc = _Service(_NoRecognizer(), ServeConfig(decode_processes=0))  # type: ignore[arg-type]

    def match(self, data: bytes) -> None:
        from landmarks.data.decode import decode_image
        from landmarks.errors import ImageDecodeError

        self.file.write_bytes(data)
        try:
            img = decode_image(self.file)
        except ImageDecodeError:
            return
        self.sift(img)

    def recognize(self, data: bytes) -> None:
        self.file.write_bytes(data)
        i, x, reason = self.dataset[0]
        assert (x is None) != (reason is None)

    def service(self, data: bytes) -> None:
        from landmarks.data.decode import image_info
        from landmarks.errors import ImageDecodeError
        from landmarks.serve import ApiError

        try:
            image_info(data, name="upload", max_pixels=self.svc.conf.max_pixels)
            self.svc.decode(data, "upload")
        except ImageDecodeError:
            return
        except ApiError as e:
            if e.status >= 500:
                raise


class _NoRecognizer:
    local = None


def http_cases(cases: list[bytes]) -> dict[str, object]:
    """Send ``cases`` to a real ``landmarks serve`` (built by bench/abuse.py's tiny index); count statuses."""
    import httpx

    sys.path.insert(0, str(REPO / "bench"))
    from abuse import server, tiny_index

    codes: Counter[int] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        index = tiny_index(Path(tmp))
        with server(index, "--workers", "2", log_path=Path(tmp) / "fuzz.log") as (url, _):
            with httpx.Client(timeout=60) as client:
                for data in cases:
                    codes[
                        client.post(
                            url + "/v1/recognize", content=data, headers={"content-type": "image/jpeg"}
                        ).status_code
                    ] += 1
            log = (Path(tmp) / "fuzz.log").read_text(errors="replace")
    return {
        "sent": len(cases),
        "statuses": dict(codes),
        "server_errors": sum(v for k, v in codes.items() if k >= 500),
        "tracebacks_in_log": log.count("Traceback"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=1800.0, help="stop early after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--http", type=int, default=0, help="also send this many cases to a real server")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # Pillow warns on corrupt EXIF; the outcome is what counts
    import cv2

    cv2.setNumThreads(1)
    rng = random.Random(args.seed)
    base = seeds()
    escapes: dict[str, Counter[str]] = {"match": Counter(), "recognize": Counter(), "service": Counter()}
    examples: dict[str, str] = {}
    t0 = time.monotonic()
    done = 0
    http_sample: list[bytes] = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        paths = Paths(Path(tmp))
        for n in range(args.cases):
            if time.monotonic() - t0 > args.seconds:
                break
            data = mutate(base[n % len(base)], rng)
            if len(http_sample) < args.http and n % 7 == 0:
                http_sample.append(data)
            for name in ("match", "recognize", "service"):
                try:
                    getattr(paths, name)(data)
                except Exception as e:
                    key = f"{type(e).__name__}: {str(e)[:80]}"
                    escapes[name][key] += 1
                    examples.setdefault(key, traceback.format_exc(limit=3))
            done += 1
            if done % 10_000 == 0:
                print(
                    f"{done} cases, {time.monotonic() - t0:.0f} s, escapes "
                    f"{ {k: sum(v.values()) for k, v in escapes.items()} }",
                    flush=True,
                )
    result: dict[str, object] = {
        "cases": done,
        "seconds": round(time.monotonic() - t0, 1),
        "escapes": {k: sum(v.values()) for k, v in escapes.items()},
        "escape_kinds": {k: dict(v.most_common(5)) for k, v in escapes.items()},
    }
    if args.http:
        result["http"] = http_cases(http_sample)
    print(json.dumps(result, indent=2))
    for key, tb in list(examples.items())[:3]:
        print(key, tb, sep="\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
