"""What ``pe-triage demo`` shows while kfp.local runs a pipeline, and what it keeps in ``kfp.log``.

kfp.local prints every step's output to stdout and logs task starts, finishes and cache hits on the
root logger. All of it goes to the log file, except the configuration: a parameter of every step,
which kfp's executor logs in full with each step's input, so the file holds its digest instead. The
console gets one line per finished, cached or skipped task, named by its display name (``train
stage 1``) and, for a per-site step, by the site its component logs first (``ingest site-a ok
(13 s)``); and, while a step runs, the lines a person waits for: each epoch and the periodic
progress lines of :mod:`pe_triage.progress`.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_CACHED = re.compile(r"Task (\S+) cache hit")
_SKIPPED = re.compile(r"Skipping conditional task (\S+)")
#: a string parameter ``config`` in the executor input kfp logs (json.dumps, one key per line)
_CONFIG = re.compile(r'^(\s*"config": )("(?:[^"\\]|\\.)*")(,?)\s*$')
#: a log line in the text format of pe_triage.logs: ``LEVEL logger: message``
_TEXT_RECORD = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")
#: a periodic line of pe_triage.progress: ``<desc>: <n>/<total> <unit> (<rate>/s, ETA <s> s)``
_PROGRESS = re.compile(r": \d+/\d+ \S+ \([\d.]+/s, ETA \d+ s\)")
_SITE = re.compile(r"site (\S+)")


def display_names(pipeline: Any) -> dict[str, str]:
    """Task name -> display name (the task name where none is set) of a pipeline, nested DAGs included:
    kfp.local names tasks by their names (``train-2``), a person by what they do (``train stage 2``)."""
    spec = pipeline.pipeline_spec
    names: dict[str, str] = {}

    def walk(dag: Any) -> None:
        for name, task in dag.tasks.items():
            names[name] = task.task_info.name or name
            if task.component_ref.name in spec.components and spec.components[task.component_ref.name].HasField("dag"):
                walk(spec.components[task.component_ref.name].dag)

    walk(spec.root.dag)
    return names


def config_digest(text: str) -> str:
    """How the log names a configuration: the sha256 of its text (``sha256sum`` of the file)."""
    return f"<configuration: sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}, {len(text)} characters>"


def without_config(line: str) -> str:
    """``line`` with a logged ``"config"`` parameter replaced by its digest."""
    if not (m := _CONFIG.match(line)):
        return line
    return f"{m.group(1)}{json.dumps(config_digest(json.loads(m.group(2))))}{m.group(3)}"


def log_record(line: str) -> tuple[str, str] | None:
    """(logger, message) of a line logged by pe_triage.logs, in text or JSON; None for other lines."""
    line = line.strip()
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except ValueError:
            return None
        return (str(entry.get("logger", "")), str(entry["message"])) if isinstance(entry, dict) and "message" in entry else None
    m = _TEXT_RECORD.match(line)
    return (m.group(1), m.group(2)) if m else None


class StepConsole(io.TextIOBase):
    """A stream for kfp.local's output: every line to ``log``, the few a person reads to ``terminal``."""

    def __init__(self, log: io.TextIOBase, terminal: io.TextIOBase, names: Mapping[str, str]) -> None:
        self.log, self.terminal, self.names = log, terminal, names
        self.pending = ""
        self.started: dict[str, list[float]] = {}
        self.labels: dict[str, str] = {}
        self.running: str | None = None

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for raw in lines:
            self.log.write(without_config(raw) + "\n")
            self._follow(_ANSI.sub("", raw))
        return len(text)

    def finish(self) -> None:
        """Write out a last line without its newline."""
        if self.pending:
            self.write("\n")

    def _follow(self, line: str) -> None:
        if m := _STARTED.search(line):
            self.running = m.group(1)
            self.labels[self.running] = self.names.get(self.running, self.running)
            self.started.setdefault(self.running, []).append(time.monotonic())
        elif (m := _FINISHED.search(line)) and self.started.get(m.group(1)):  # kfp logs some finishes twice
            seconds = time.monotonic() - self.started[m.group(1)].pop(0)
            self.running = None
            self._say(self.labels[m.group(1)], f"{'ok' if m.group(2) == 'SUCCESS' else m.group(2)} ({seconds:.0f} s)")
        elif m := _CACHED.search(line):
            self._say(self.names.get(m.group(1), m.group(1)), "cached")
        elif _SKIPPED.search(line):  # the only condition: the gates
            self._say("promote", "skipped: the gates did not pass")
        elif self.running and (record := log_record(line)):
            self._relay(self.running, *record)

    def _relay(self, task: str, logger: str, message: str) -> None:
        """A step's own line: the site it works on names the step; epochs and progress are shown."""
        if logger.startswith("pe_triage_components") and (m := _SITE.fullmatch(message)):
            self.labels[task] = f"{self.names.get(task, task)} {m.group(1)}"
        elif message.startswith("epoch ") or _PROGRESS.search(message):
            label = self.labels[task]
            self.terminal.write(f"      {message if message.startswith(label) else f'{label}: {message}'}\n")
            self.terminal.flush()

    def _say(self, label: str, what: str) -> None:
        self.terminal.write(f"      {label:<22} {what}\n")
        self.terminal.flush()


@contextmanager
def captured(log_path: Path, terminal: io.TextIOBase, config_text: str, names: Mapping[str, str]) -> Iterator[None]:
    """Run kfp.local inside: its output to ``log_path`` (appended; the configuration written once, at
    the top), a :class:`StepConsole`'s lines to ``terminal``."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, builtins.print
    with open(log_path, "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: configuration {config_digest(config_text)}, the config "
                  f"parameter of every step below:\n{config_text or '(empty: the defaults)'}\n===\n")
        lines = StepConsole(log, terminal, names)
        root.handlers, root.level = [logging.StreamHandler(lines)], logging.INFO
        try:
            with redirect_stdout(lines):
                yield
        finally:  # kfp.local indents by replacing builtins.print, and a cache hit can leave it replaced
            lines.finish()
            root.handlers, root.level, builtins.print = saved
