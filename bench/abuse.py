"""Probes of issue 11 re-run: concurrent writers, writers beside a running service, scan bombs, slow clients.

Everything runs on 127.0.0.1 against a tiny index built here (a random-init ``test_resnet`` run at 64 px over
synthetic photos), bounded in count and time:

- ``locks``: ``--trials`` times, two ``landmarks add`` of 10 images each at once, with ``--wait`` (both must
  land) and without (the second must land or be refused with one line); counts images lost.
- ``serve-write``: ``landmarks serve`` running; a CLI ``add`` must be answered by the service and stay on
  disk after the service's next HTTP add; a CLI ``remove`` must not come back.
- ``bomb``: a client sends ordinary recognitions back to back (baseline, then while two 6000x6000 scan-bomb
  uploads are sent) and reports p50/p99 and status counts; once with the default scan limit (bombs refused
  at once) and once with the limit lifted (``--max-jpeg-scans 1000000``: the decoder processes are killed at
  the request timeout).
- ``slow``: 300 connections sending one header byte per second, then 40 uploads of 10 MiB held open; how
  many are still open after the header/body timeouts, and the server's RSS before, at peak, after.

    nice .venv/bin/python bench/abuse.py [locks|serve-write|bomb|slow|all] [--out bench/results/abuse.md]

``bench/fuzz.py`` is the mutated-JPEG fuzz of the same issue.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO / "src")}


# --------------------------------------------------------------------------------------------------
# Fixtures: a tiny run, photos, an index
# --------------------------------------------------------------------------------------------------


def photo(seed: int, size: tuple[int, int] = (160, 120)) -> np.ndarray:
    """A smooth random colour photo ``(h, w, 3)`` uint8."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), np.float32)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, **kw: object) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def collection(root: Path, landmarks: list[str], per: int, seed: int) -> Path:
    for i, lm in enumerate(landmarks):
        for j in range(per):
            p = root / lm / f"{lm}_{j}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(jpeg(photo(seed + 100 * i + j)))
    return root


def tiny_index(root: Path) -> Path:
    """A random-init test_resnet run and an index of 4 landmarks x 5 photos under ``root``."""
    import torch

    from landmarks.checkpoint import save_model
    from landmarks.config import to_dict
    from landmarks.data.transforms import Preprocess
    from landmarks.extract import ExtractConfig
    from landmarks.models.net import LandmarkNet, ModelConfig
    from landmarks.pipeline import build_index

    torch.manual_seed(0)
    conf = ModelConfig(backbone="test_resnet", embedding_dim=64)
    save_model(
        root / "run",
        LandmarkNet(conf, num_classes=4),
        {
            "config": {"model": to_dict(conf)},
            "classes": {},
            "num_classes": 4,
            "preprocessing": Preprocess(64).to_dict(),
        },
    )
    collection(root / "coll", ["a", "b", "c", "d"], 5, 0)
    return build_index(
        root / "run",
        root / "coll",
        root / "index",
        extract_conf=ExtractConfig(num_workers=0),
        show_progress=False,
    )


def landmarks_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "landmarks", *[str(a) for a in args]]


def count_images(index: Path) -> int:
    from landmarks.index import LandmarkIndex

    return len(LandmarkIndex.load(index))


# --------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------


def probe_locks(trials: int) -> dict[str, object]:
    """Two CLI adds at once, ``trials`` times with --wait and ``trials`` times without."""
    rows = []
    for trial in range(trials):
        for wait in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                index = tiny_index(root)
                before = count_images(index)
                srcs = [collection(root / f"new{k}", [f"n{trial}x{k}"], 10, 1000 * (k + 1)) for k in (0, 1)]
                extra = ["--wait", "120"] if wait else []
                procs = [
                    subprocess.Popen(
                        landmarks_cmd("add", index, s, "--workers", "0", *extra),
                        env=ENV,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    for s in srcs
                ]
                outs = [p.communicate(timeout=300) for p in procs]
                codes = [p.returncode for p in procs]
                after = count_images(index)
                landed = 10 * sum(c == 0 for c in codes)
                refused = [e.strip().splitlines()[-1] for (o, e), c in zip(outs, codes) if c != 0]
                clean = all(c in (0, 2) for c in codes) and all("being written by PID" in r for r in refused)
                tracebacks = sum("Traceback" in e for _, e in outs)
                rows.append(
                    {
                        "trial": trial,
                        "wait": wait,
                        "exit": codes,
                        "images_before": before,
                        "images_after": after,
                        "expected": before + landed,
                        "lost": before + landed - after,
                        "refusals_clean": clean,
                        "tracebacks": tracebacks,
                        "refused": refused[:1],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    ok = all(r["lost"] == 0 and r["refusals_clean"] and r["tracebacks"] == 0 for r in rows)
    return {"rows": rows, "ok": ok}


@contextmanager
def server(index: Path, *flags: str, log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``landmarks serve`` on a free port (read from its log); always stopped."""
    logf = open(log_path, "wb")
    proc = subprocess.Popen(
        landmarks_cmd("serve", "--index", index, "--port", "0", *flags),
        env=ENV,
        stdout=logf,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        url = ""
        while not url:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log_path.read_text(errors='replace')}")
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)/", log_path.read_text(errors="replace"))
            url = m.group(1) if m else ""
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()


def probe_serve_write(root: Path) -> dict[str, object]:
    import httpx

    from landmarks.index import LandmarkIndex

    index = tiny_index(root)
    token = "probe-token"
    with server(index, "--token", token, log_path=root / "serve-write.log") as (url, _):
        cli_img = photo(4242)
        collection(root / "cli", ["cli-place"], 0, 0)
        p = root / "cli" / "cli-place" / "x.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg(cli_img))
        rc = subprocess.run(
            landmarks_cmd("add", index, root / "cli", "--workers", "0"),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        ).returncode
        top = httpx.post(
            url + "/v1/recognize", content=jpeg(cli_img), headers={"content-type": "image/jpeg"}, timeout=60
        ).json()["neighbours"][0]
        served = top["id"] == "cli-place/x"
        r = httpx.post(
            url + "/v1/index/images",
            data={"landmark": "http-place"},
            files={"files": ("h.jpg", jpeg(photo(777)), "image/jpeg")},
            headers={"authorization": f"Bearer {token}"},
            timeout=120,
        )
        disk = LandmarkIndex.load(index)
        kept = disk.row_of("cli-place/x") is not None and disk.row_of(r.json()["ids"][0]) is not None
        rc2 = subprocess.run(
            landmarks_cmd("remove", index, "cli-place/x"), env=ENV, capture_output=True, timeout=300
        ).returncode
        ids = [
            n["id"]
            for n in httpx.post(
                url + "/v1/recognize",
                content=jpeg(cli_img),
                headers={"content-type": "image/jpeg"},
                timeout=60,
            ).json()["neighbours"]
        ]
        relabel = httpx.post(
            url + "/v1/index/images",
            data={"landmark": "other-place"},
            files={"files": ("h.jpg", jpeg(photo(777)), "image/jpeg")},
            headers={"authorization": f"Bearer {token}"},
            timeout=120,
        ).status_code
    out = {
        "cli_add_rc": rc,
        "cli_image_served": served,
        "http_add": r.status_code,
        "both_on_disk": kept,
        "cli_remove_rc": rc2,
        "removed_not_served": "cli-place/x" not in ids,
        "relabel_status": relabel,
    }
    out["ok"] = (
        rc == 0
        and served
        and r.status_code == 200
        and kept
        and rc2 == 0
        and out["removed_not_served"]
        and relabel == 409
    )
    print(json.dumps(out), flush=True)
    return out


def scan_bomb(width: int, height: int, repeats: int) -> bytes:
    """A progressive JPEG of a flat image whose last scan is repeated ``repeats`` times (6000x6000, 2,000: ~330 KB)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 130, 140)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data[data.rfind(b"\xff\xda") : -2]
    return data[:-2] + last * repeats + b"\xff\xd9"


def _latencies(url: str, body: bytes, seconds: float) -> tuple[list[float], dict[int, int]]:
    import httpx

    lat: list[float] = []
    codes: dict[int, int] = {}
    end = time.monotonic() + seconds
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            code = client.post(
                url + "/v1/recognize", content=body, headers={"content-type": "image/jpeg"}
            ).status_code
            lat.append(1000 * (time.perf_counter() - t0))
            codes[code] = codes.get(code, 0) + 1
    return lat, codes


def _pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 1) if xs else float("nan")


def probe_bomb(root: Path, seconds: float) -> dict[str, object]:
    import httpx

    index = tiny_index(root)
    bomb = scan_bomb(6000, 6000, 2000)
    body = jpeg(photo(5))
    out: dict[str, object] = {"bomb_bytes": len(bomb)}
    for label, flags in (
        ("default scan limit", []),
        ("scan limit lifted, killed at the timeout", ["--max-jpeg-scans", "1000000", "--timeout-s", "5"]),
    ):
        with server(index, "--workers", "2", *flags, log_path=root / f"bomb-{len(out)}.log") as (url, _):
            _latencies(url, body, 2)  # warm-up
            base, base_codes = _latencies(url, body, seconds)
            bomb_codes: list[int] = []

            def send_bomb(bomb_codes: list[int] = bomb_codes, url: str = url) -> None:
                try:
                    bomb_codes.append(
                        httpx.post(
                            url + "/v1/recognize",
                            content=bomb,
                            headers={"content-type": "image/jpeg"},
                            timeout=120,
                        ).status_code
                    )
                except httpx.HTTPError:
                    bomb_codes.append(-1)

            attackers = [threading.Thread(target=send_bomb) for _ in range(2)]
            for t in attackers:
                t.start()
            during, during_codes = _latencies(url, body, seconds)
            for t in attackers:
                t.join(150)
            row = {
                "baseline_p50_ms": _pct(base, 50),
                "baseline_p99_ms": _pct(base, 99),
                "baseline_codes": base_codes,
                "attack_p50_ms": _pct(during, 50),
                "attack_p99_ms": _pct(during, 99),
                "attack_codes": during_codes,
                "bomb_status": bomb_codes,
            }
            out[label] = row
            print(label, json.dumps(row), flush=True)
    return out


def _rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` and its children (the decoder processes), in KiB."""
    total = 0
    pids = [pid]
    try:
        pids += [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def probe_slow(root: Path, n_slow: int, n_uploads: int) -> dict[str, object]:
    index = tiny_index(root)
    out: dict[str, object] = {}
    with server(index, "--workers", "2", log_path=root / "slow.log") as (url, proc):
        host, port = url.removeprefix("http://").split(":")
        rss0 = _rss_kb(proc.pid)
        socks: list[socket.socket] = []
        for _ in range(n_slow):
            try:
                socks.append(socket.create_connection((host, int(port)), timeout=5))
            except OSError:
                break
        request = b"POST /v1/recognize HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100\r\n\r\n"
        t0 = time.monotonic()
        peak = rss0
        open_at: dict[str, int] = {}
        alive = set(range(len(socks)))
        for step in range(20):  # one header byte per second per connection
            for i in list(alive):
                try:
                    socks[i].sendall(request[step : step + 1])
                except OSError:
                    alive.discard(i)
            for i in list(alive):
                socks[i].setblocking(False)
                try:
                    if socks[i].recv(1) == b"":
                        alive.discard(i)
                except BlockingIOError:
                    pass
                except OSError:
                    alive.discard(i)
            peak = max(peak, _rss_kb(proc.pid))
            open_at[f"{round(time.monotonic() - t0)}s"] = len(alive)
            time.sleep(1.0)  # the client's pace: 1 byte/s
        for s in socks:
            s.close()
        out["slow_headers"] = {
            "connections": len(socks),
            "still_open_by_time": open_at,
            "rss_before_mb": round(rss0 / 1024, 1),
            "rss_peak_mb": round(peak / 1024, 1),
        }
        print("slow headers", json.dumps(out["slow_headers"]), flush=True)

        # uploads of 10 MiB, all but the last byte sent, then held
        big = 10 * 2**20
        head = (
            f"POST /v1/recognize HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {big}\r\n\r\n"
        ).encode()
        payload = b"\xff" * (big - 1)
        ups: list[socket.socket] = []
        statuses: dict[str, int] = {}
        rss1 = _rss_kb(proc.pid)
        peak = rss1

        def upload() -> None:
            try:
                s = socket.create_connection((host, int(port)), timeout=30)
                ups.append(s)
                s.sendall(head + payload)
            except OSError as e:
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1

        threads = [threading.Thread(target=upload) for _ in range(n_uploads)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 40:
            peak = max(peak, _rss_kb(proc.pid))
            time.sleep(0.5)
        for t in threads:
            t.join(5)
        for s in ups:
            s.setblocking(False)
            try:
                reply = s.recv(200)
                code = (
                    reply.split(b" ")[1].decode()
                    if reply.startswith(b"HTTP/")
                    else ("closed" if reply == b"" else "?")
                )
            except BlockingIOError:
                code = "still open"
            except OSError:
                code = "reset"
            statuses[code] = statuses.get(code, 0) + 1
            s.close()
        time.sleep(2)
        out["held_uploads"] = {
            "uploads": n_uploads,
            "after_40s": statuses,
            "rss_before_mb": round(rss1 / 1024, 1),
            "rss_peak_mb": round(peak / 1024, 1),
            "rss_after_mb": round(_rss_kb(proc.pid) / 1024, 1),
        }
        print("held uploads", json.dumps(out["held_uploads"]), flush=True)
        import httpx

        out["healthz_after"] = httpx.get(url + "/healthz", timeout=10).status_code
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "probe", nargs="?", default="all", choices=["locks", "serve-write", "bomb", "slow", "all"]
    )
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument(
        "--seconds", type=float, default=12.0, help="length of each latency window of the bomb probe"
    )
    ap.add_argument("--slow", type=int, default=300)
    ap.add_argument("--uploads", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.probe in ("locks", "all"):
            results["locks"] = probe_locks(args.trials)
        if args.probe in ("serve-write", "all"):
            results["serve-write"] = probe_serve_write(root / "sw")
        if args.probe in ("bomb", "all"):
            results["bomb"] = probe_bomb(root / "bomb", args.seconds)
        if args.probe in ("slow", "all"):
            results["slow"] = probe_slow(root / "slow", args.slow, args.uploads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    raise SystemExit(main())
