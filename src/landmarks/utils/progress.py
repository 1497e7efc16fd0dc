"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise (CI, files, pipes)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger("landmarks")


def is_terminal() -> bool:
    """True when stderr is an interactive terminal."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


class Progress:
    """A progress reporter with ``update(n, **postfix)`` and ``close()``.

    On a terminal it drives a tqdm bar; elsewhere it logs ``desc: done/total (rate/s, ETA)`` at most
    every ``interval_s`` seconds and once at the end.
    """

    def __init__(
        self, total: int | None, desc: str, unit: str = "img", interval_s: float = 10.0, disable: bool = False
    ):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.interval_s = interval_s
        self.n = 0
        self.postfix: dict[str, object] = {}
        self._start = time.perf_counter()
        self._last = self._start
        self._bar = None
        self.disable = disable
        if not disable and is_terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: object) -> None:
        """Advance by ``n``; ``postfix`` values (loss, acc, ...) are shown beside the bar."""
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        if self.disable:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            logger.info(self.line())

    def line(self) -> str:
        """The plain-text status line."""
        elapsed = time.perf_counter() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_fmt_time((self.total - self.n) / rate)}")
        parts.extend(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        return ", ".join(parts)

    def close(self) -> None:
        """Finish the bar (or log the final line)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self.disable:
            logger.info(self.line() + " (done)")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it"
) -> Iterator[T]:
    """Wrap an iterable with a :class:`Progress`."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, unit) as p:
        for item in iterable:
            yield item
            p.update(1)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
