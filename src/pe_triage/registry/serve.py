"""``pe-triage serve``: a registered model behind HTTP, reloaded when its alias moves.

:class:`ModelHolder` owns the model being served. A background thread (:meth:`ModelHolder.poll_forever`)
loads it through :func:`pe_triage.registry.registry.load_registered` (integrity-checked, nothing
unpickled; ``@champion`` must be explained by its recorded decision), moves it to the GPU when there
is one, warms it with one inference on the pyfunc's input example and only then serves it; after that
it checks the alias every ``serve.reload_poll_s`` seconds (or at once on SIGHUP) and swaps in a new
version the same way. The swap is one reference assignment: a request keeps the model it started
with, and a failed load keeps the old model serving. The HTTP layer and :func:`run` are in
:mod:`pe_triage.registry.serve_http`.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from pe_triage.config import RegistryConfig
from pe_triage.predict import Triage, default_device
from pe_triage.registry.pyfunc import input_example
from pe_triage.registry.registry import load_registered, registry_client

log = logging.getLogger("pe_triage.serve")


@dataclass(frozen=True)
class Served:
    """A loaded, warmed model and what it is (no paths: a local folder's name may say anything)."""

    triage: Triage
    name: str | None
    version: int | None
    alias: str | None


class ModelHolder:
    """The served model (:attr:`current`, None until the first load succeeds) and its reloading."""

    def __init__(self, model_uri: str, *, tracking_uri: str | None = None, registry: RegistryConfig = RegistryConfig(),
                 device: str | None = None) -> None:
        match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/\d+)", model_uri)
        if match is None and not Path(model_uri).is_dir():
            raise ValueError(f"{model_uri}: give models:/<name>@<alias>, models:/<name>/<version> or a local model folder")
        self.model_uri = model_uri
        self.name: str | None = match.group(1) if match else None
        self.alias: str | None = match.group(2) if match else None
        self.tracking_uri = tracking_uri
        self.registry = registry
        self.device = device or default_device()
        self.current: Served | None = None
        self.reason = "the model is loading"
        self.wake = threading.Event()
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Load the model when none is served yet or the alias has moved; True when a new one now
        serves. Any failure is logged and leaves the current model (if any) serving."""
        with self._lock:
            try:
                if self.current is not None and not self._moved():
                    return False
                served = self._load()
            except Exception as e:  # a bad new version, an unreachable registry: keep serving what we have
                kept = f"still serving version {self.current.version}" if self.current else "not ready"
                log.error("loading %s failed (%s): %s: %s", self.model_uri, kept, type(e).__name__, e)
                if self.current is None:
                    self.reason = f"the model failed to load ({type(e).__name__}: {e}); retrying every poll"
                return False
            previous, self.current = self.current, served
            log.info("serving %s version %s on %s (was %s)", served.name or "a local model", served.version,
                     self.device, previous.version if previous else "none")
            return True

    def _moved(self) -> bool:
        if self.alias is None or self.current is None:
            return False
        found = registry_client(self.tracking_uri).get_model_version_by_alias(self.name, self.alias)
        return int(found.version) != self.current.version

    def _load(self) -> Served:
        triage, version = load_registered(self.model_uri, uri=self.tracking_uri, config=self.registry)
        triage.to(self.device)
        triage.predict_slices(input_example())  # warm: the first call pays allocator and kernel set-up
        return Served(triage, self.name, version, self.alias)

    def start(self, stop: threading.Event, period_s: float) -> None:
        """:meth:`poll_forever` in a daemon thread, and an alias check at once on SIGHUP (call from the
        main thread: only it may set signal handlers)."""
        threading.Thread(target=self.poll_forever, args=(stop, period_s), name="model-poller", daemon=True).start()
        signal.signal(signal.SIGHUP, lambda *_: self.wake.set())

    def poll_forever(self, stop: threading.Event, period_s: float) -> None:
        """Refresh now and then every ``period_s`` seconds, or at once when :attr:`wake` is set."""
        while not stop.is_set():
            self.refresh()
            self.wake.wait(period_s)
            self.wake.clear()
