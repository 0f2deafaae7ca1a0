"""Progress a person can follow: a bar on a terminal, a log line every ``every_s`` seconds elsewhere.

A step run by a person (``pe-triage ingest`` in a shell) shows a tqdm bar on stderr; the same step
in a KFP pod or in CI, where stderr is a file, logs ``<desc>: <n>/<total> <unit> (<rate>/s, ETA
<s> s)`` at most every ``every_s`` seconds, and always one line when it ends. ``PE_TRIAGE_PROGRESS``
forces ``bar``, ``log`` or ``off`` (no bar, no periodic lines; the closing line is still logged).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

log = logging.getLogger(__name__)

Mode = Literal["bar", "log", "off"]
MODE_ENV = "PE_TRIAGE_PROGRESS"


def progress_mode() -> Mode:
    """The mode from ``PE_TRIAGE_PROGRESS``, else a bar on a terminal and log lines elsewhere."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced in ("bar", "log", "off"):
        return forced  # type: ignore[return-value]
    return "bar" if sys.stderr.isatty() else "log"


class Progress:
    """Counts done units of a known (or unknown) total; see :func:`progress`."""

    def __init__(self, total: int | None, desc: str, unit: str, logger: logging.Logger, every_s: float,
                 mode: Mode) -> None:
        self.total, self.desc, self.unit, self.every_s, self.mode = total, desc, unit, every_s, mode
        self.n = 0
        self._log = logger
        self._start = self._last = time.monotonic()
        self._postfix: dict[str, Any] = {}
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm  # only a terminal needs it

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True, file=sys.stderr)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more units done; ``postfix`` (e.g. ``loss=0.31``) is shown beside the count."""
        self.n += n
        if postfix:
            self._postfix.update(postfix)
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(self._postfix, refresh=False)
            return
        now = time.monotonic()
        if self.mode == "log" and now - self._last >= self.every_s:
            self._last = now
            self._log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``<desc>: <n>/<total> <unit> (<rate>/s, ETA <s> s) k=v ...``: what a log line says."""
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        rate = self.n / elapsed
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        eta = f", ETA {(self.total - self.n) / rate:.0f} s" if self.total is not None and rate > 0 else ""
        extra = "".join(f" {k}={_fmt(v)}" for k, v in self._postfix.items())
        return f"{self.desc}: {count} {self.unit} ({rate:.1f}/s{eta}){extra}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elapsed = time.monotonic() - self._start
        self._log.info("%s: %d %s in %.1f s (%.1f/s)", self.desc, self.n, self.unit, elapsed,
                       self.n / max(elapsed, 1e-9))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@contextmanager
def progress(total: int | None, desc: str, *, unit: str = "it", logger: logging.Logger | None = None,
             every_s: float = 30.0) -> Iterator[Progress]:
    """A :class:`Progress` for one loop, closed (and its summary line logged) when the block ends."""
    bar = Progress(total, desc, unit, logger or log, every_s, progress_mode())
    try:
        yield bar
    finally:
        bar.close()
