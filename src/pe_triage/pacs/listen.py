"""``pe-triage listen``'s core: a spool of received studies on disk and the loop that triages each
complete study and sends its results back, at least once and never twice per model version.

Layout, per study (named by :func:`~pe_triage.pacs.study_tag`, never by its UID)::

    <spool>/<tag>/in/      instances as received (file names: a hash of the SOP Instance UID)
    <spool>/<tag>/work/    the instances a triage is reading (moved from in/ when it starts)
    <spool>/<tag>/out/     the built result objects, kept until the destination stored them
    <spool>/<tag>/state.json  received -> triaged -> sent, the model versions, attempts, last error
    <spool>/failed/<tag>/  a study that failed every attempt, with reason.txt

The result objects are built once per (study, model version) and stored in ``out/`` before they
are sent, so a retry or a restart resends the same objects (same SOP Instance UIDs): the PACS sees
one SR per version. A study already sent by the current version is not triaged again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pe_triage.config import IngestConfig, ListenConfig, MonitorConfig, PacsConfig
from pe_triage.monitoring import record_triage
from pe_triage.pacs import study_tag
from pe_triage.pacs.dicomweb import PacsUnavailable, StowRejected
from pe_triage.pacs.stow import to_outbox
from pe_triage.pacs.study import triage_folder
from pe_triage.predict import PredictError, Triage

log = logging.getLogger(__name__)

STATE, INCOMING, WORK, RESULTS, FAILED = "state.json", "in", "work", "out", "failed"
#: how often the loop looks for complete studies: well below any sensible quiet period
POLL_S = 1.0


@dataclass(frozen=True)
class Model:
    """The model a study is triaged with, and the version written into its results."""

    triage: Triage
    name: str
    version: str


#: the model to use now; None while none is loaded (studies wait, no attempt is counted)
ModelSource = Callable[[], "Model | None"]
#: sends every ``*.dcm`` of a folder and removes them once stored; raises ``PacsError`` otherwise
Sender = Callable[[Path], int]


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


class Spool:
    """The received studies on disk, and when each last received an instance (``clock`` seconds)."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds identifiers: owner only
        self.clock = clock
        self.lock = threading.RLock()  # the SCP's threads and the loop share the spool
        self.last: dict[str, float] = {}
        self.next_try: dict[str, float] = {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != FAILED):
            if self.pending(folder.name):  # a restart: wait one quiet period, more may still come
                self.last[folder.name] = clock()
        if self.last:
            log.info("resuming %d unfinished stud(ies) from the spool", len(self.last))

    def pending(self, tag: str) -> bool:
        """Whether the study has instances or results not yet dealt with."""
        folder = self.root / tag
        return any(_files(folder / sub) for sub in (INCOMING, WORK, RESULTS))

    def state(self, tag: str) -> dict[str, Any]:
        path = self.root / tag / STATE
        if path.is_file():
            return dict(json.loads(path.read_text()))
        return {"state": "received", "sent_versions": [], "results_version": None, "attempts": 0, "error": None}

    def save(self, tag: str, state: dict[str, Any]) -> None:
        path = self.root / tag / STATE
        with self.lock:
            path.with_suffix(".tmp").write_text(json.dumps(state, indent=1))
            path.with_suffix(".tmp").replace(path)  # atomic: a crash leaves the old state or the new

    def receive(self, study_uid: str, sop_uid: str, data: bytes) -> str:
        """Store one received instance (a resent instance replaces itself); returns the study's tag."""
        tag = study_tag(study_uid)
        incoming = self.root / tag / INCOMING
        name = hashlib.sha256(sop_uid.encode()).hexdigest()[:32] + ".dcm"
        with self.lock:
            incoming.mkdir(mode=0o700, parents=True, exist_ok=True)
            (incoming / f"{name}.part").write_bytes(data)
            (incoming / f"{name}.part").replace(incoming / name)  # a half-written file is never read
            first = tag not in self.last
            self.last[tag] = self.clock()
            state = self.state(tag)
            if state["state"] == "sent":
                state["state"] = "received"
            self.save(tag, state)
        if first:
            log.info("%s: receiving instances", tag)
        return tag

    def due(self, quiet_s: float) -> list[str]:
        """Studies quiet for ``quiet_s`` whose back-off (after a failure) has passed."""
        now = self.clock()
        with self.lock:
            return [tag for tag, last in self.last.items() if now - last >= quiet_s and now >= self.next_try.get(tag, 0.0)]

    def claim(self, tag: str) -> Path:
        """Move the received instances into ``work/`` (the triage's input) and return it."""
        work = self.root / tag / WORK
        with self.lock:
            work.mkdir(mode=0o700, exist_ok=True)
            incoming = self.root / tag / INCOMING
            for path in _files(incoming):
                path.replace(work / path.name)
            if incoming.is_dir():
                shutil.rmtree(incoming)  # empty now, or a .part of a crash: its sender did not get a success
        return work

    def finish(self, tag: str, state: dict[str, Any]) -> None:
        """Save the final state; the study stays due only if instances arrived meanwhile."""
        with self.lock:
            if _files(self.root / tag / INCOMING):
                state["state"] = "received"
            else:
                self.last.pop(tag, None)
            self.next_try.pop(tag, None)
            self.save(tag, state)

    def fail(self, tag: str, reason: str, *, retries: int, backoff_s: float, permanent: bool) -> None:
        """Count a failed attempt: retry after a back-off, or after the last attempt (or a permanent
        failure) move the study to ``failed/`` with its reason."""
        with self.lock:
            state = self.state(tag)
            state["attempts"] += 1
            state["error"] = reason
            self.save(tag, state)
            if state["attempts"] < retries and not permanent:
                delay = backoff_s * 2 ** (state["attempts"] - 1)
                self.next_try[tag] = self.clock() + delay
                log.warning("%s: attempt %d of %d failed (%s); retrying in %.0f s", tag, state["attempts"], retries,
                            reason, delay)
                return
            target = self.root / FAILED / tag
            n = 1
            while target.exists():
                n += 1
                target = self.root / FAILED / f"{tag}-{n}"
            target.parent.mkdir(mode=0o700, exist_ok=True)
            (self.root / tag).replace(target)
            (target / "reason.txt").write_text(f"{reason}\nattempts: {state['attempts']}\n")
            self.last.pop(tag, None)
            self.next_try.pop(tag, None)
        log.error("%s: failed after %d attempt(s), moved to %s/: %s", tag, state["attempts"], target.relative_to(self.root),
                  reason)


def _reason(exc: Exception) -> str:
    """A failure's reason for logs and reason.txt: the messages of our own errors (written without
    identifiers); only the type of anything else (a library's message may quote a header value)."""
    if isinstance(exc, (PredictError, OSError)):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__} (details withheld: they may quote the study's headers)"


class Listener:
    """Triage each complete study of the spool with the current model and send its results."""

    def __init__(self, spool: Spool, model: ModelSource, send: Sender, *, config: ListenConfig, pacs: PacsConfig,
                 ingest: IngestConfig, monitor: MonitorConfig = MonitorConfig()) -> None:
        self.spool, self.model, self.send = spool, model, send
        self.config, self.pacs, self.ingest, self.monitor = config, pacs, ingest, monitor

    def step(self) -> None:
        """One pass: every due study once (none while no model is loaded)."""
        model = self.model()
        if model is None:
            return
        for tag in self.spool.due(self.config.quiet_s):
            try:
                self.process(tag, model)
            except Exception as e:  # one study's failure is that study's: logged, retried, never the node's
                permanent = isinstance(e, PredictError) and not isinstance(e, (PacsUnavailable, StowRejected))
                self.spool.fail(tag, _reason(e), retries=self.config.retries, backoff_s=self.config.backoff_s,
                                permanent=permanent)

    def process(self, tag: str, model: Model) -> None:
        """received -> triaged (results in out/) -> sent; each step resumable after a crash."""
        folder = self.spool.root / tag
        work = self.spool.claim(tag)
        state = self.spool.state(tag)
        if model.version in state["sent_versions"]:
            log.info("%s: already triaged and sent by model version %s: not triaged again", tag, model.version)
        else:
            if state["results_version"] != model.version or not _files(folder / RESULTS):
                self._triage(tag, work, model, state)
            sent = self.send(folder / RESULTS)
            log.info("%s: %d result object(s) sent", tag, sent)
            state["sent_versions"].append(model.version)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(folder / RESULTS, ignore_errors=True)
        state.update({"state": "sent", "results_version": None, "attempts": 0, "error": None})
        self.spool.finish(tag, state)

    def _triage(self, tag: str, work: Path, model: Model, state: dict[str, Any]) -> None:
        log.info("%s: %d instance(s), quiet for %.0f s: triaging with version %s", tag, len(_files(work)),
                 self.config.quiet_s, model.version)
        result = triage_folder(work, model.triage, model=model.name, version=model.version, ingest=self.ingest,
                               config=self.pacs)
        shutil.rmtree(self.spool.root / tag / RESULTS, ignore_errors=True)
        to_outbox(result.objects, self.spool.root / tag, RESULTS)
        record_triage(self.monitor, result.report, source="listen")
        state.update({"state": "triaged", "results_version": model.version,
                      "triage": result.report["studies"][0]["triage"]})
        self.spool.save(tag, state)
        log.info("%s: triage %s", tag, state["triage"])

    def run(self, stop: threading.Event) -> None:
        """Pass over the spool every :data:`POLL_S` seconds until ``stop`` is set."""
        while not stop.is_set():
            self.step()
            stop.wait(POLL_S)


__all__ = ["Listener", "Model", "ModelSource", "Sender", "Spool"]
