"""The page at ``/`` driven by headless Chromium over the DevTools protocol: a real upload through the
file input (``DOM.setFileInputFiles``), a drag-and-drop, and an error, each answered on the page.

Needs Debian's ``chromium`` (``.ci/run`` installs it when missing); skipped with the reason otherwise.
The DevTools websocket is spoken with a minimal RFC 6455 client below (stdlib only; no browser
download, no websocket package).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_fake import COLOURS, RunningServer, fake_server, make_image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


# --------------------------------------------------------------------------------------------------
# A minimal websocket client and DevTools session
# --------------------------------------------------------------------------------------------------


class WebSocket:
    """Client side of RFC 6455: text frames out (masked), text frames in; answers pings."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        u = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=timeout_s)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = (
            (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(
                n, "big"
            )
            if n
            else b""
        )
        self.sock.sendall(head + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        parts: list[bytes] = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else b""
            data = self._read(n)
            if mask:
                data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self._send_frame(0xA, data)
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode in (0x0, 0x1):
                parts.append(data)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class DevTools:
    """One page target: ``call`` a method and get its result; events are kept in ``events``."""

    def __init__(self, ws_url: str):
        self.ws = WebSocket(ws_url)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        res = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 20.0) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.evaluate(
                    "document.body ? document.body.dataset.state + ' | ' + "
                    "document.body.innerText.slice(0, 500) : 'no body'"
                )
                raise AssertionError(f"timed out waiting for {expression!r}; page: {state}")
            time.sleep(0.05)

    def exceptions(self) -> list[str]:
        return [
            json.dumps(e["params"])[:500] for e in self.events if e["method"] == "Runtime.exceptionThrown"
        ]


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless browser found (tried {', '.join(BROWSERS)}); install Debian's chromium")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    exe = _browser()
    profile = tmp_path_factory.mktemp("chromium-profile")
    log_path = profile.parent / "chromium.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    devtools = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"chromium did not start its DevTools server:\n{log_path.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = []
        while not targets:
            targets = [
                t
                for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                if t.get("type") == "page"
            ]
            if not targets and time.monotonic() > deadline:
                pytest.fail("chromium has no page target")
            time.sleep(0.05)
        devtools = DevTools(targets[0]["webSocketDebuggerUrl"])
        devtools.call("Runtime.enable")
        devtools.call("Page.enable")
        devtools.call("DOM.enable")
        yield devtools
    finally:
        if devtools is not None:
            devtools.ws.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("serve-page")
    with fake_server(tmp, "--workers", "2") as s:
        yield s


def _open_page(dt: DevTools, url: str) -> None:
    dt.call("Page.navigate", url=url + "/")
    dt.wait_for(
        "document.readyState === 'complete' && !!document.getElementById('file') && "
        "document.getElementById('index-info').textContent.includes('images of')"
    )


def _upload(dt: DevTools, path: Path) -> None:
    root = dt.call("DOM.getDocument")["root"]["nodeId"]
    node = dt.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    assert node, "the page has no #file input"
    dt.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)


def _wait_settled(dt: DevTools) -> str:
    return str(
        dt.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
    )


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_upload_through_the_file_input_shows_the_answer(
    browser: DevTools, server: RunningServer, tmp_path: Path
) -> None:
    from PIL import Image

    photo = tmp_path / "red photo.jpg"
    Image.fromarray(make_image(COLOURS["tower-red"], size=(96, 72))).save(photo, quality=95)
    _open_page(browser, server.url)
    assert "3 images of 3 landmarks" in browser.evaluate("document.getElementById('index-info').textContent")
    _upload(browser, photo)
    assert _wait_settled(browser) == "done", browser.evaluate("document.getElementById('error').textContent")

    assert browser.evaluate("document.getElementById('landmark').textContent") == "tower-red"
    confidence = float(browser.evaluate("document.getElementById('confidence').textContent"))
    expected = httpx.post(
        server.url + "/v1/recognize", content=photo.read_bytes(), headers={"content-type": "image/jpeg"}
    ).json()
    assert confidence == pytest.approx(expected["confidence"], abs=1e-3)
    items = browser.evaluate("[...document.querySelectorAll('#neighbours li')].map(li => li.innerText)")
    assert len(items) == 3 and "tower-red" in items[0] and "42 inliers" in items[0]
    # Every neighbour thumbnail loads (served by /v1/thumbnail/<id> with a '/' in the id).
    browser.wait_for(
        "[...document.querySelectorAll('#neighbours img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    # The verified neighbour gets its inlier drawing.
    caption = browser.wait_for(
        "(() => { const c = document.querySelector('#matches figcaption');"
        " return c && !c.textContent.includes('drawing ') && c.textContent; })()"
    )
    assert "inliers" in caption
    assert browser.wait_for(
        "(() => { const i = document.querySelector('#matches img');"
        " return i && i.complete && i.naturalWidth > 0; })()"
    )
    assert browser.exceptions() == []


def test_drop_a_photo(browser: DevTools, server: RunningServer) -> None:
    _open_page(browser, server.url)
    # A green photo drawn on a canvas, dropped on the drop zone as a File in a DataTransfer.
    browser.evaluate(
        """(async () => {
        const c = document.createElement('canvas'); c.width = 80; c.height = 60;
        const g = c.getContext('2d'); g.fillStyle = 'rgb(40, 180, 60)'; g.fillRect(0, 0, 80, 60);
        const blob = await new Promise((resolve) => c.toBlob(resolve, 'image/jpeg', 0.95));
        const dt = new DataTransfer();
        dt.items.add(new File([blob], 'green.jpg', { type: 'image/jpeg' }));
        document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
        return true;
    })()""",
        await_promise=True,
    )
    assert _wait_settled(browser) == "done"
    assert browser.evaluate("document.getElementById('landmark').textContent") == "bridge-green"
    assert browser.exceptions() == []


def test_not_an_image_shows_the_reason(browser: DevTools, server: RunningServer, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    _open_page(browser, server.url)
    _upload(browser, text)
    assert _wait_settled(browser) == "error"
    error = browser.evaluate("document.getElementById('error').textContent")
    assert error.startswith("415") and "not a recognised image" in error
    assert browser.evaluate("document.getElementById('result').hidden") is True
    assert browser.exceptions() == []
