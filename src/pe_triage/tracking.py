"""MLflow tracking for the pipeline steps. With the ``registry`` package, the only code that imports
mlflow, always lazily: a step that tracks nothing never loads it.

Steps get a :class:`Tracker` from :func:`start_run`: a real run when a tracking URI is configured
(argument or the standard ``MLFLOW_TRACKING_URI``), a :class:`NullTracker` otherwise, so library
code never branches on whether MLflow is there. Runs are driven through ``MlflowClient`` with an
explicit run id (no global active run), so two steps in one process never log into each other.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: MLflow's parameter value limit (characters)
_PARAM_MAX = 6000


class TrackingUnavailable(RuntimeError):
    """The configured tracking server does not answer; the message names the URI (never credentials)."""


def tracking_uri(uri: str | None = None) -> str | None:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _safe_uri(uri: str) -> str:
    """The URI without user:password (never logged)."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def wait_for_server(uri: str, *, attempts: int = 4, backoff_s: float = 1.0) -> None:
    """Check an http(s) tracking server's ``/health`` with exponential backoff; raise
    :class:`TrackingUnavailable` after ``attempts`` failures. Other URI schemes (files, databases)
    need no server."""
    if not uri.startswith(("http://", "https://")):
        return
    error: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            error = e
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    raise TrackingUnavailable(f"MLflow tracking server {_safe_uri(uri)} is not reachable after {attempts} attempts: {error}")


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "0.001", ...}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:_PARAM_MAX]
    return out


class NullTracker:
    """Tracking switched off: every call does nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        pass


class Tracker(NullTracker):
    """One MLflow run, addressed by id."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)


def experiment_id_for(client: Any, name: str) -> str:
    """The experiment's id, created when missing (parallel steps may race to create it)."""
    from mlflow.exceptions import MlflowException

    if found := client.get_experiment_by_name(name):
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:
        if found := client.get_experiment_by_name(name):
            return str(found.experiment_id)
        raise


@contextmanager
def start_run(
    *, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None, uri: str | None = None,
    run_id: str | None = None,
) -> Iterator[NullTracker]:
    """A tracked run for the block (FINISHED on success, FAILED on an exception), or a
    :class:`NullTracker` when no tracking URI is configured. ``run_id`` continues an earlier run
    (a resumed training logs into the run it started)."""
    resolved = tracking_uri(uri)
    if resolved is None:
        yield NullTracker()
        return
    wait_for_server(resolved)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolved)
    if run_id is not None:
        run = client.get_run(run_id)
        client.update_run(run_id, status="RUNNING")
    else:
        experiment_id = experiment_id_for(client, experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()})
    log.info("tracking to MLflow run %s (experiment %r)", run.info.run_id, experiment)
    try:
        yield Tracker(client, run.info.run_id)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
