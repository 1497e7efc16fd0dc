"""HTTP tests of ``landmarks.serve`` against real uvicorn processes on 127.0.0.1.

The servers run ``tests/serve_fake.py`` (a deterministic colour-based fake recognizer behind the real
app and runner); the last test serves a tiny real index through ``landmarks serve`` when the index and
recognition modules are available.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from landmarks.serve import (
    PathBook,
    ReadWriteLock,
    ServeConfig,
    WorkerPool,
    decode_error_status,
    recognition_to_json,
)
from serve_fake import BUG_SIZE, COLOURS, SLOW_SIZE, RunningServer, fake_server, make_image, scan_bomb

TOKEN = "s3cret-token"
LIMIT_MB = 1.0  # the launcher's --max-upload-mb
MAX_PIXELS = 4_000_000  # the launcher's --max-pixels


# --------------------------------------------------------------------------------------------------
# Images and bodies
# --------------------------------------------------------------------------------------------------


def encode(img: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width x height`` (valid CRCs, one small IDAT)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


RED = make_image(COLOURS["tower-red"])
GREEN = make_image(COLOURS["bridge-green"])
GREY = make_image((128, 128, 128))
SLOW_JPEG = encode(make_image(COLOURS["gate-blue"], size=SLOW_SIZE))
BUG_JPEG = encode(make_image(COLOURS["gate-blue"], size=BUG_SIZE))
RED_JPEG = encode(RED)
NOISE_JPEG = encode(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))


def recognize(url: str, data: bytes, content_type: str = "image/jpeg", **kw: Any) -> httpx.Response:
    return httpx.post(
        url + "/v1/recognize", content=data, headers={"content-type": content_type}, timeout=30, **kw
    )


def recognize_file(
    url: str, data: bytes, name: str = "photo.jpg", ctype: str = "image/jpeg"
) -> httpx.Response:
    return httpx.post(url + "/v1/recognize", files={"file": (name, data, ctype)}, timeout=30)


def healthy(url: str) -> dict[str, Any]:
    r = httpx.get(url + "/healthz", timeout=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    return body


# --------------------------------------------------------------------------------------------------
# Servers (one process each, module-scoped)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """2 workers, token set, 1 MiB uploads, 4 Mpx images."""
    tmp = tmp_path_factory.mktemp("serve")
    with fake_server(
        tmp,
        "--workers",
        "2",
        "--queue",
        "4",
        "--max-upload-mb",
        str(LIMIT_MB),
        "--max-pixels",
        str(MAX_PIXELS),
        "--token",
        TOKEN,
        "--upload-dir",
        str(tmp / "uploads"),
    ) as s:
        yield s


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """1 worker, 1 queue slot, 1.5 s timeout, slow requests take 2.5 s; no token."""
    tmp = tmp_path_factory.mktemp("serve-busy")
    with fake_server(tmp, "--workers", "1", "--queue", "1", "--timeout-s", "1.5", "--slow-s", "2.5") as s:
        yield s


# --------------------------------------------------------------------------------------------------
# Library pieces (in-process, no server)
# --------------------------------------------------------------------------------------------------


def test_worker_pool_is_bounded() -> None:
    pool = WorkerPool(workers=1, queue_size=1)
    gate = threading.Event()
    try:
        a = pool.submit(gate.wait, 5)
        b = pool.submit(lambda: 7)
        assert a is not None and b is not None
        assert pool.submit(lambda: 8) is None  # 1 running + 1 queued = capacity
        assert pool.stats() == {"workers": 1, "running": 1, "queued": 1, "capacity": 2}
        gate.set()
        assert b.result(5) == 7
        deadline = time.monotonic() + 5
        while pool.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.stats()["running"] == 0 and pool.stats()["queued"] == 0
        assert pool.submit(lambda: 9) is not None
    finally:
        gate.set()
        pool.shutdown()


def test_read_write_lock_excludes_writer() -> None:
    lock = ReadWriteLock()
    events: list[str] = []
    reader_in = threading.Event()

    def writer() -> None:
        with lock.write():
            events.append("w")

    def late_reader() -> None:
        with lock.read():
            events.append("r2")
        reader_in.set()

    with lock.read():
        t = threading.Thread(target=writer)
        t.start()
        assert lock.wait_for_writers(1, timeout_s=10)  # the writer is blocked inside write(), waiting
        assert events == []  # ... for the reader
        r = threading.Thread(target=late_reader)
        r.start()  # a new reader queues behind the waiting writer (no writer starvation)
        assert not reader_in.is_set() and events == []
    t.join(10)
    r.join(10)
    assert events == ["w", "r2"]


def test_recognition_to_json_is_strict_json() -> None:
    from serve_fake import Neighbour, Recognition

    rec = Recognition(
        "x", float("nan"), True, [Neighbour("a/1", "x", float("inf"), None, None)], {"embed": 1.23456}
    )
    out = recognition_to_json(rec, {"decode": 2.0})
    assert out == {
        "landmark": "x",
        "confidence": 0.0,
        "is_landmark": True,
        "neighbours": [{"id": "a/1", "landmark": "x", "score": 0.0, "inliers": None}],
        "timings_ms": {"embed": 1.235, "decode": 2.0},
    }
    json.dumps(out, allow_nan=False)


def test_path_book_is_bounded() -> None:
    book = PathBook(2)
    for i in range(3):
        book.put(f"id{i}", Path(f"/x/{i}.jpg"))
    assert book.get("id0") is None and book.get("id2") == Path("/x/2.jpg")


def test_decode_error_status() -> None:
    from landmarks.errors import ImageDecodeError, ImageTooLargeError

    assert decode_error_status(ImageDecodeError("u", "not a recognised image (supported: ...)")) == 415
    assert decode_error_status(ImageDecodeError("u", "truncated image (x)")) == 400
    assert decode_error_status(ImageTooLargeError("u", "refused: 1 pixels")) == 400


def test_serve_config_from_dict_is_strict() -> None:
    from landmarks.config import from_dict
    from landmarks.errors import ConfigError

    assert from_dict(ServeConfig, {"workers": 3, "rerank": "local"}).workers == 3
    with pytest.raises(ConfigError):
        from_dict(ServeConfig, {"wrokers": 3})


# --------------------------------------------------------------------------------------------------
# Recognition over HTTP
# --------------------------------------------------------------------------------------------------


def test_recognize_multipart(server: RunningServer) -> None:
    r = recognize_file(server.url, RED_JPEG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"landmark", "confidence", "is_landmark", "neighbours", "timings_ms"}
    assert body["landmark"] == "tower-red" and body["is_landmark"] is True
    assert 0.0 < body["confidence"] <= 1.0
    assert [n["landmark"] for n in body["neighbours"]][0] == "tower-red"
    assert all(set(n) == {"id", "landmark", "score", "inliers"} for n in body["neighbours"])
    assert body["neighbours"][0]["inliers"] == 42 and body["neighbours"][1]["inliers"] is None
    assert {"decode", "queue", "server_total", "embed"} <= set(body["timings_ms"])


def test_recognize_raw_body_matches_multipart(server: RunningServer) -> None:
    a = recognize(server.url, RED_JPEG).json()
    b = recognize_file(server.url, RED_JPEG).json()
    c = recognize(server.url, RED_JPEG, content_type="application/octet-stream").json()
    for x in (a, c):
        assert (x["landmark"], x["confidence"], x["neighbours"]) == (
            b["landmark"],
            b["confidence"],
            b["neighbours"],
        )


def test_recognize_png_and_no_landmark(server: RunningServer) -> None:
    r = recognize(server.url, encode(GREEN, "PNG"), content_type="image/png")
    assert r.status_code == 200, r.text
    assert r.json()["landmark"] == "bridge-green"
    r = recognize(server.url, encode(GREY))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["landmark"] is None and body["is_landmark"] is False and body["confidence"] == 0.0


# --------------------------------------------------------------------------------------------------
# The bad-input suite: every case a 4xx with a reason, the server healthy after each
# --------------------------------------------------------------------------------------------------

_MULTIPART_NO_BOUNDARY = {"content-type": "multipart/form-data"}


def _oversize_chunks() -> Iterator[bytes]:
    for _ in range(40):  # 2.5 MiB, no Content-Length (chunked)
        yield b"\xff" * 65536


BAD_INPUTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("empty raw body", {"content": b"", "headers": {"content-type": "image/jpeg"}}, 400, "empty"),
    ("empty multipart file", {"files": {"file": ("a.jpg", b"", "image/jpeg")}}, 400, "empty"),
    (
        "text as image/jpeg",
        {"content": b"hello, world\n" * 10, "headers": {"content-type": "image/jpeg"}},
        415,
        "not a recognised image",
    ),
    (
        "text file in multipart",
        {"files": {"file": ("notes.txt", b"just some text", "text/plain")}},
        415,
        "not a recognised image",
    ),
    (
        "text/plain content type",
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        415,
        "Content-Type",
    ),
    (
        "JPEG sent as application/json",
        {"content": RED_JPEG, "headers": {"content-type": "application/json"}},
        415,
        "Content-Type",
    ),
    (
        "truncated JPEG",
        {"content": NOISE_JPEG[: len(NOISE_JPEG) // 2], "headers": {"content-type": "image/jpeg"}},
        400,
        "truncated",
    ),
    (
        "JPEG with garbage after the header",
        {"content": NOISE_JPEG[:200] + b"\x00" * 3000, "headers": {"content-type": "image/jpeg"}},
        400,
        "upload",
    ),
    (
        "PNG header claiming 100000x100000",
        {"content": png_header_only(100_000, 100_000), "headers": {"content-type": "image/png"}},
        400,
        "pixels",
    ),
    (
        "PNG header claiming 3000x3000 (over --max-pixels)",
        {"content": png_header_only(3000, 3000), "headers": {"content-type": "image/png"}},
        400,
        "exceeds the limit",
    ),
    (
        "multipart without a 'file' field",
        {"files": {"photo": ("a.jpg", RED_JPEG, "image/jpeg")}},
        400,
        "no 'file' field",
    ),
    (
        "multipart 'file' as a plain field",
        {"data": {"file": "not a file"}, "files": {"x": ("x.txt", b"x")}},
        400,
        "file part",
    ),
    (
        "multipart without a boundary",
        {"content": b"--x\r\n\r\n", "headers": _MULTIPART_NO_BOUNDARY},
        400,
        "multipart",
    ),
    (
        "oversize raw body (Content-Length)",
        {"content": b"\xff" * int(1.5 * 2**20), "headers": {"content-type": "image/jpeg"}},
        413,
        "too large",
    ),
    (
        "oversize chunked body",
        {"content": _oversize_chunks, "headers": {"content-type": "image/jpeg"}},
        413,
        "too large",
    ),
    (
        "oversize multipart",
        {"files": {"file": ("big.jpg", b"\xff" * int(1.5 * 2**20), "image/jpeg")}},
        413,
        "too large",
    ),
]


@pytest.mark.parametrize("case,kwargs,status,reason", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(
    server: RunningServer, case: str, kwargs: dict[str, Any], status: int, reason: str
) -> None:
    kwargs = dict(kwargs)
    if callable(kwargs.get("content")):
        kwargs["content"] = kwargs["content"]()
    r = httpx.post(server.url + "/v1/recognize", timeout=30, **kwargs)
    detail = r.json().get("detail", "")
    print(f"\nBAD-INPUT | {case} | {r.status_code} | {detail}")
    assert r.status_code == status, r.text
    assert reason.lower() in detail.lower(), detail
    assert r.headers["content-type"].startswith("application/json")
    healthy(server.url)


def test_oversize_refused_before_the_body_is_read(server: RunningServer) -> None:
    """A header claiming a terabyte is answered 413 at once, without sending (or reading) any body."""
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(
            b"POST /v1/recognize HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 1000000000000\r\n\r\n"
        )
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head
    healthy(server.url)


def test_other_client_errors_are_json(server: RunningServer) -> None:
    r = httpx.get(server.url + "/v1/recognize")
    assert r.status_code == 405 and r.json()["detail"]
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and r.json()["detail"]
    r = httpx.post(server.url + "/v1/matches", content=RED_JPEG, headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and "neighbour" in r.json()["detail"]
    healthy(server.url)


def test_recognizer_bug_is_a_json_500_and_the_server_survives(server: RunningServer) -> None:
    r = recognize(server.url, BUG_JPEG)
    assert r.status_code == 500
    assert "RuntimeError" in r.json()["detail"]
    assert "fake recognizer bug" in server.log()  # logged with its traceback
    healthy(server.url)
    assert recognize(server.url, RED_JPEG).status_code == 200


# --------------------------------------------------------------------------------------------------
# Concurrency, timeouts, shutdown
# --------------------------------------------------------------------------------------------------


def _wait_for(url: str, key: str, value: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while healthy(url)[key] != value:
        assert time.monotonic() < deadline, f"/healthz never showed {key}={value}"
        time.sleep(0.02)


def test_slow_request_does_not_block_health_and_full_pool_is_503(busy_server: RunningServer) -> None:
    url = busy_server.url
    results: dict[str, httpx.Response] = {}

    def post(name: str, data: bytes, ctype: str) -> None:
        results[name] = recognize(url, data, content_type=ctype)

    a = threading.Thread(target=post, args=("slow", SLOW_JPEG, "image/jpeg"))
    a.start()
    _wait_for(url, "running", 1)
    b = threading.Thread(target=post, args=("queued", RED_JPEG, "image/jpeg"))
    b.start()
    _wait_for(url, "queued", 1)
    # All workers and queue slots are taken: health answers, a further request is refused at once.
    h = healthy(url)
    assert (h["running"], h["queued"]) == (1, 1)
    assert a.is_alive(), "the slow request should still be running while /healthz answers"
    r = recognize(url, RED_JPEG)
    assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
    assert "busy" in r.json()["detail"]
    a.join(15)
    b.join(15)
    assert results["slow"].status_code == 504 and "timed out" in results["slow"].json()["detail"]
    assert results["queued"].status_code == 504
    # Once the slow work has finished in its thread, the service answers normally again.
    _wait_for(url, "running", 0)
    assert recognize(url, RED_JPEG).status_code == 200


def test_adding_is_off_without_a_token(busy_server: RunningServer) -> None:
    r = httpx.post(
        busy_server.url + "/v1/index/images",
        data={"landmark": "x"},
        files={"files": ("a.jpg", RED_JPEG, "image/jpeg")},
        headers={"authorization": "Bearer x"},
    )
    assert r.status_code == 403 and "--token" in r.json()["detail"]
    assert httpx.get(busy_server.url + "/v1/index").json()["adding_enabled"] is False


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    with fake_server(tmp_path, "--workers", "1", "--slow-s", "1.5") as s:
        result: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: result.setdefault("r", recognize(s.url, SLOW_JPEG)))
        t.start()
        _wait_for(s.url, "running", 1)
        s.proc.send_signal(signal.SIGTERM)
        t.join(15)
        assert s.proc.wait(timeout=15) == 0
        assert result["r"].status_code == 200, result["r"].text
        log = s.log()
        assert "received SIGTERM" in log and "stopped" in log


# --------------------------------------------------------------------------------------------------
# Index endpoints, thumbnails, matches, token guard
# --------------------------------------------------------------------------------------------------


def test_index_info(server: RunningServer) -> None:
    r = httpx.get(server.url + "/v1/index")
    assert r.status_code == 200
    body = r.json()
    assert body["size"] >= 3 and body["landmarks"] >= 3 and body["model"] == "fake-colour"
    assert body["adding_enabled"] is True and body["details"]["model_fingerprint"] == "0" * 16
    assert body["generation"] == body["details"]["generation"] >= 1


def test_thumbnails_only_for_index_ids(server: RunningServer) -> None:
    neighbours = recognize(server.url, RED_JPEG).json()["neighbours"]
    nid = neighbours[0]["id"]
    assert "/" in nid  # ids with slashes are served too
    r = httpx.get(f"{server.url}/v1/thumbnail/{nid}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size[0] > 0
    for bad in [
        "unknown/0001",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "tower-red/..%2F..%2Fserve.py",
    ]:
        r = httpx.get(f"{server.url}/v1/thumbnail/{bad}")
        assert r.status_code == 404, (bad, r.status_code)
        assert "unknown image id" in r.json()["detail"]


def test_matches_endpoint(server: RunningServer) -> None:
    nid = recognize(server.url, RED_JPEG).json()["neighbours"][0]["id"]
    r = httpx.post(
        f"{server.url}/v1/matches", params={"neighbour": nid}, files={"file": ("q.jpg", RED_JPEG)}, timeout=30
    )
    assert r.status_code == 200, r.text
    assert r.content.startswith(b"\x89PNG") and int(r.headers["x-inliers"]) >= 0
    r = httpx.post(
        f"{server.url}/v1/matches", params={"neighbour": "nope/1"}, files={"file": ("q.jpg", RED_JPEG)}
    )
    assert r.status_code in (404, 501)


def test_add_images_token_guard_and_effect(server: RunningServer) -> None:
    url = server.url + "/v1/index/images"
    yellow = encode(make_image((220, 200, 20)))
    yellow2 = encode(make_image((225, 205, 25), size=(50, 44)))
    files = [("files", ("y1.jpg", yellow, "image/jpeg")), ("files", ("y2.jpg", yellow2, "image/jpeg"))]
    size0 = httpx.get(server.url + "/v1/index").json()["size"]

    r = httpx.post(url, data={"landmark": "golden-hall"}, files=files)
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
    r = httpx.post(
        url, data={"landmark": "golden-hall"}, files=files, headers={"authorization": "Bearer wrong"}
    )
    assert r.status_code == 401
    auth = {"authorization": f"Bearer {TOKEN}"}
    r = httpx.post(url, files=files, headers=auth)
    assert r.status_code == 400 and "landmark" in r.json()["detail"]
    r = httpx.post(url, data={"landmark": "has space"}, files=files, headers=auth)
    assert r.status_code == 400 and "whitespace" in r.json()["detail"]
    bad = [*files, ("files", ("broken.jpg", NOISE_JPEG[:300], "image/jpeg"))]
    r = httpx.post(url, data={"landmark": "golden-hall"}, files=bad, headers=auth)
    assert r.status_code == 400 and "broken.jpg" in r.json()["detail"], r.text
    assert httpx.get(server.url + "/v1/index").json()["size"] == size0  # nothing added

    r = httpx.post(url, data={"landmark": "golden-hall"}, files=files, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["added"] == 2 and body["landmark"] == "golden-hall" and len(body["ids"]) == 2
    assert httpx.get(server.url + "/v1/index").json()["size"] == size0 + 2
    # The new images are found, labelled and have thumbnails.
    top = recognize(server.url, yellow).json()["neighbours"][0]
    assert top["id"] == body["ids"][0] and top["landmark"] == "golden-hall"
    assert httpx.get(f"{server.url}/v1/thumbnail/{top['id']}").status_code == 200
    # Adding the same bytes again adds nothing new (content-addressed ids).
    r = httpx.post(url, data={"landmark": "golden-hall"}, files=files[:1], headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["added"] == 0
    # ... and under another landmark it is refused: relabelling is remove + add
    r = httpx.post(url, data={"landmark": "other-hall"}, files=files[:1], headers=auth, timeout=30)
    assert r.status_code == 409 and "indexed as golden-hall, given other-hall" in r.json()["detail"], r.text
    assert httpx.get(server.url + "/v1/index").json()["size"] == size0 + 2


# --------------------------------------------------------------------------------------------------
# Hostile clients: scan bombs, slow or vanishing clients, forged log lines, too many connections
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """1 worker, 1 queue slot, 1.5 s timeout, no scan limit (to test the kill), 1 s header / 2 s body timeouts."""
    tmp = tmp_path_factory.mktemp("serve-guarded")
    with fake_server(
        tmp,
        "--workers",
        "1",
        "--queue",
        "1",
        "--timeout-s",
        "1.5",
        "--max-jpeg-scans",
        "1000000",
        "--header-timeout-s",
        "1",
        "--body-timeout-s",
        "2",
    ) as s:
        yield s


def wait_for_log(server: RunningServer, needle: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while needle not in server.log():
        assert time.monotonic() < deadline, f"{needle!r} not logged:\n{server.log()}"
        time.sleep(0.02)
    return server.log()


def closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    """True when the server closes ``sock`` (EOF or reset) within ``timeout_s``."""
    sock.settimeout(timeout_s)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_scan_bomb_is_refused_before_decoding(server: RunningServer) -> None:
    r = recognize(server.url, scan_bomb(256, 256, 300))
    assert r.status_code == 400 and "more than 100 scans" in r.json()["detail"], r.text


def test_a_decode_past_the_timeout_is_killed_and_frees_its_worker(guarded_server: RunningServer) -> None:
    bomb = scan_bomb(2000, 2000, 2000)  # ~8 s of decoding; the server's timeout is 1.5 s, 1 worker
    t0 = time.monotonic()
    r = recognize(guarded_server.url, bomb)
    assert r.status_code == 504, r.text
    r = recognize(guarded_server.url, RED_JPEG)  # the worker is free again: the decode was killed
    assert r.status_code == 200 and r.json()["landmark"] == "tower-red", r.text
    assert time.monotonic() - t0 < 6.0  # well before the bomb would have finished decoding


def test_idle_and_slow_header_connections_are_closed(guarded_server: RunningServer) -> None:
    host, port = guarded_server.url.removeprefix("http://").split(":")
    idle = socket.create_connection((host, int(port)))
    slow = socket.create_connection((host, int(port)))
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    try:
        assert closed_by_server(idle, 10) and closed_by_server(slow, 10)
    finally:
        idle.close()
        slow.close()
    healthy(guarded_server.url)


def test_slow_body_gets_408(guarded_server: RunningServer) -> None:
    host, port = guarded_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/recognize HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 10000\r\n\r\n" + RED_JPEG[:100]
        )
        sock.settimeout(10)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


def test_client_disconnect_is_one_quiet_line_and_log_lines_are_escaped(guarded_server: RunningServer) -> None:
    host, port = guarded_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/recognize HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 100000\r\n\r\n" + RED_JPEG[:100]
        )
    log = wait_for_log(guarded_server, "POST /v1/recognize 499")
    httpx.get(guarded_server.url + "/forged%0aINFO%20GET%20/admin%20200%0d%0aX")
    log = wait_for_log(guarded_server, "/forged")
    assert "Traceback" not in log and " 500 " not in log
    [gone] = [line for line in log.splitlines() if "POST /v1/recognize 499" in line]
    assert " INFO " in gone  # a quiet 4xx-class line, no traceback
    [forged] = [line for line in log.splitlines() if "/forged" in line]
    assert "/forged\\nINFO GET /admin 200\\r\\nX 404" in forged
    assert not any(line.startswith("INFO GET /admin") for line in log.splitlines())


def test_connections_beyond_the_cap_are_closed(tmp_path: Path) -> None:
    with fake_server(tmp_path, "--max-connections", "3", "--header-timeout-s", "30") as s:
        host, port = s.url.removeprefix("http://").split(":")
        socks = [socket.create_connection((host, int(port))) for _ in range(6)]
        try:
            assert [closed_by_server(x, 2) for x in socks[3:]] == [True] * 3
            assert not any(closed_by_server(x, 0.2) for x in socks[:3])
        finally:
            for x in socks:
                x.close()
        healthy(s.url)


# --------------------------------------------------------------------------------------------------
# OpenAPI, page, CLI
# --------------------------------------------------------------------------------------------------


def test_openapi_and_docs(server: RunningServer) -> None:
    spec = httpx.get(server.url + "/openapi.json").json()
    paths = spec["paths"]
    for p in [
        "/healthz",
        "/v1/recognize",
        "/v1/matches",
        "/v1/index",
        "/v1/index/images",
        "/v1/thumbnail/{image_id}",
    ]:
        assert p in paths, p
    body = paths["/v1/recognize"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*"} <= set(body)
    assert {"413", "415", "503", "504"} <= set(paths["/v1/recognize"]["post"]["responses"])
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_page_is_served(server: RunningServer) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="file"' in r.text and "v1/recognize" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_cli_refuses_a_taken_port_before_loading(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = subprocess.run(
            [sys.executable, "-m", "landmarks", "serve", "--index", str(tmp_path), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert p.returncode == 2 and "cannot listen" in p.stderr, p.stderr


def test_cli_refuses_a_missing_index(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "landmarks", "serve", "--index", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "landmarks", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0 and "--token" in p.stdout and "--max-upload-mb" in p.stdout


# --------------------------------------------------------------------------------------------------
# End to end: a tiny real index (random-init model) served by `landmarks serve`
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    from serve_fake import build_tiny_index, run_server

    root = tmp_path_factory.mktemp("serve-real")
    index_dir = build_tiny_index(root)
    cmd = [
        sys.executable,
        "-m",
        "landmarks",
        "serve",
        "--index",
        str(index_dir),
        "--port",
        "0",
        "--workers",
        "2",
        "--token",
        TOKEN,
        "--timeout-s",
        "60",
    ]
    with run_server(cmd, root / "server.log", timeout_s=120) as s:
        yield s, root


def test_end_to_end_real_index(real_server: tuple[RunningServer, Path]) -> None:
    server, root = real_server
    info = httpx.get(server.url + "/v1/index").json()
    assert (info["size"], info["landmarks"], info["model"]) == (9, 3, "run")
    assert len(info["details"]["model_fingerprint"]) == 64

    query = (root / "images" / "lm1" / "2.jpg").read_bytes()
    r = recognize_file(server.url, query)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"landmark", "confidence", "is_landmark", "neighbours", "timings_ms"}
    assert body["neighbours"][0]["id"] == "lm1/2"  # the image itself is its own nearest neighbour
    assert body["landmark"] in {"lm0", "lm1", "lm2"} and {"embed", "search", "decode"} <= set(
        body["timings_ms"]
    )
    assert httpx.get(f"{server.url}/v1/thumbnail/lm1/2").status_code == 200
    r = httpx.post(
        server.url + "/v1/matches",
        params={"neighbour": "lm1/2"},
        files={"file": ("q.jpg", query)},
        timeout=60,
    )
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG"), r.text

    r = recognize(server.url, NOISE_JPEG[: len(NOISE_JPEG) // 2])
    assert r.status_code == 400 and "truncated" in r.json()["detail"]

    # Add a new landmark over HTTP; it is searchable at once and saved in the index folder.
    new = encode(make_image((250, 250, 250), size=(90, 70)))
    r = httpx.post(
        server.url + "/v1/index/images",
        data={"landmark": "new-place"},
        files={"files": ("n.jpg", new, "image/jpeg")},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    new_id = r.json()["ids"][0]
    assert r.json()["added"] == 1 and httpx.get(server.url + "/v1/index").json()["size"] == 10
    top = recognize(server.url, new).json()["neighbours"][0]
    assert (top["id"], top["landmark"]) == (new_id, "new-place")

    from landmarks.index import LandmarkIndex

    assert LandmarkIndex.load(root / "index").row_of(new_id) is not None
    healthy(server.url)


def test_listening_socket_says_tcp() -> None:
    """asyncio sets TCP_NODELAY on accepted sockets only when the listener's proto is IPPROTO_TCP;
    without it every keep-alive response waited ~40 ms (Nagle + delayed ACK)."""
    from landmarks.serve import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_cli_writes_while_serving_are_served_and_kept(real_server: tuple[RunningServer, Path]) -> None:
    """A CLI add is answered by the running service and survives the service's next HTTP add; a CLI removal
    is not resurrected (issue 11: the service used to write from its stale copy and erase the CLI's images)."""
    import contextlib as _ctx

    from landmarks.cli import main as landmarks_main
    from landmarks.index import LandmarkIndex

    server, root = real_server
    cli_img = make_image((10, 240, 250), size=(96, 72))
    path = root / "cli-new" / "cli-place" / "a.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(cli_img).save(path, quality=95)
    with _ctx.redirect_stdout(io.StringIO()):
        assert landmarks_main(["add", str(root / "index"), str(root / "cli-new"), "--workers", "0"]) == 0
    top = recognize(server.url, encode(cli_img)).json()["neighbours"][0]
    assert (top["id"], top["landmark"]) == ("cli-place/a", "cli-place")
    size = httpx.get(server.url + "/v1/index").json()["size"]
    other = encode(make_image((250, 120, 10), size=(88, 66)))
    r = httpx.post(
        server.url + "/v1/index/images",
        data={"landmark": "http-place"},
        files={"files": ("h.jpg", other, "image/jpeg")},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["added"] == 1, r.text
    on_disk = LandmarkIndex.load(root / "index")
    assert on_disk.row_of("cli-place/a") is not None and on_disk.row_of(r.json()["ids"][0]) is not None
    assert len(on_disk) == size + 1 == httpx.get(server.url + "/v1/index").json()["size"]
    with _ctx.redirect_stdout(io.StringIO()):
        assert landmarks_main(["remove", str(root / "index"), "cli-place/a"]) == 0
    ids = [n["id"] for n in recognize(server.url, encode(cli_img)).json()["neighbours"]]
    assert "cli-place/a" not in ids and httpx.get(server.url + "/v1/index").json()["size"] == size
