"""One logging set-up for every entry point (``pe-triage`` and the KFP components), so a person sees
the project's own progress and nothing else by default.

The project's loggers (``pe_triage``, ``pe_triage_components``, ``pe_triage_pipelines``) log at INFO,
everyone else's at WARNING: no codec tile messages, HTTP retries or kfp executor chatter. ``-v``
adds the project's debug messages and the others' INFO, ``-vv`` everyone's debug. Lines are plain
text (``LEVEL logger: message``) or, for cluster log stacks, one JSON object per line (``time``,
``level``, ``logger``, ``message``), chosen by ``--log-format`` or ``PE_TRIAGE_LOG_FORMAT``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

FORMAT_ENV = "PE_TRIAGE_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: the loggers whose INFO lines are the progress a person follows
OWN_LOGGERS = ("pe_triage", "pe_triage_components", "pe_triage_pipelines")
_MARK = "_pe_triage_handler"
#: mlflow's own console output, off unless the environment says otherwise: its logging set-up on
#: import (an INFO handler of its own) and its tqdm bar for every artifact download
_MLFLOW_ENV = {"MLFLOW_CONFIGURE_LOGGING": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: what Loki, Elasticsearch or Cloud Logging parse."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted (a redirect, a test's capture),
    not to the stream that was current at set-up, which may since have been closed."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def log_format(value: str | None = None) -> str:
    """``value``, else ``PE_TRIAGE_LOG_FORMAT``, else ``text``; anything else is a ValueError."""
    chosen = (value or os.environ.get(FORMAT_ENV) or "text").strip().lower()
    if chosen not in FORMATS:
        raise ValueError(f"log format {chosen!r} (--log-format or {FORMAT_ENV}): expected one of {', '.join(FORMATS)}")
    return chosen


def setup_logging(verbosity: int = 0, fmt: str | None = None) -> None:
    """Route every record through one handler on stderr, at the levels of the module docstring.

    Replaces a previous call's handler and a plain ``basicConfig`` handler (kfp's executor installs
    one on stdout), and leaves other handlers (a test's capture, a file) alone. MLflow, which
    otherwise installs its own INFO handler on import, is told to leave logging to this one.
    """
    formatter = JsonFormatter() if log_format(fmt) == "json" else logging.Formatter(TEXT_FORMAT)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if getattr(handler, _MARK, False) or _is_basic(handler):
            root.removeHandler(handler)
    handler = _StderrHandler()
    setattr(handler, _MARK, True)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity else logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity else logging.INFO)
    _mlflow_into_root()


@contextmanager
def configured_logging(verbosity: int = 0, fmt: str | None = None) -> Iterator[None]:
    """:func:`setup_logging` for the duration of a command; the previous handlers and levels after it
    (a command run in-process, as by the tests, leaves the process as it found it)."""
    loggers = [logging.getLogger(n) for n in ("", *OWN_LOGGERS, "mlflow")]
    saved = [(lg, lg.level, lg.handlers[:], lg.propagate) for lg in loggers]
    unset = [name for name in _MLFLOW_ENV if name not in os.environ]
    try:
        setup_logging(verbosity, fmt)
        yield
    finally:
        for logger, level, handlers, propagate in saved:
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        for name in unset:
            os.environ.pop(name, None)


def _is_basic(handler: logging.Handler) -> bool:
    """A handler as ``logging.basicConfig`` makes it: exactly a StreamHandler on stdout or stderr."""
    stream = getattr(handler, "stream", None)
    return type(handler) is logging.StreamHandler and stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def _mlflow_into_root() -> None:
    """MLflow's records through the root handler (its own goes to stderr at INFO, in its own format),
    and no bar per artifact download."""
    for name, value in _MLFLOW_ENV.items():  # read by mlflow on import and per download
        os.environ.setdefault(name, value)
    if "mlflow" in sys.modules and os.environ["MLFLOW_CONFIGURE_LOGGING"] == "false":  # imported already: undo its set-up
        mlflow_logger = logging.getLogger("mlflow")
        mlflow_logger.handlers.clear()
        mlflow_logger.propagate = True
        mlflow_logger.setLevel(logging.NOTSET)
