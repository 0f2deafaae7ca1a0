"""A local MLflow tracking server (SQLite backend, proxied artifact store on local disk).

The embedded default of ``pe-triage demo`` and the integration tests: the same HTTP server, REST
API and artifact proxying as a cluster deployment, without a cluster. One worker, because the
default four are too many for a 2-core laptop, and no background job runner (MLflow 3 starts seven
~260 MB job-consumer processes for features pe-triage does not use).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pe_triage.tracking import TrackingUnavailable, wait_for_server

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_server(root: str | Path, *, port: int | None = None, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``mlflow server`` on loopback with its state under ``root`` (kept between runs, so a
    second run sees the first one's experiments and registry); yield its URI; stop it at exit."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if exe is None:
        raise TrackingUnavailable("the mlflow command is not installed")
    command = [
        exe, "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    uri = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "ab") as server_log:
        proc = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise TrackingUnavailable(f"mlflow server exited with {proc.returncode}; see {root / 'server.log'}")
            try:
                wait_for_server(uri, attempts=1)
                break
            except TrackingUnavailable:
                if time.monotonic() > deadline:
                    raise TrackingUnavailable(f"mlflow server did not become healthy in {startup_timeout_s:.0f} s; "
                                              f"see {root / 'server.log'}") from None
                time.sleep(0.5)
        log.info("MLflow server at %s (state in %s)", uri, root)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
