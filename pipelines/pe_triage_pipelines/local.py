"""Run a pipeline on this machine with ``kfp.local``: every step a subprocess of the current Python
(``SubprocessRunner(use_venv=False)``: the package is installed, nothing is installed per step),
step outputs under ``pipeline_root``, and the KFP step cache in ``pipeline_root/.kfp_cache`` so a
second run reuses every step whose inputs, configuration and code version are unchanged.

Cluster settings (GPUs, node selectors, secrets) do not apply locally and are ignored; secrets are
whatever the calling environment holds (e.g. ``PE_TRIAGE_PSEUDONYM_KEY``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pe_triage_pipelines.cluster import ClusterOptions
from pe_triage_pipelines.compile import PIPELINES

#: a transient failure here is a server still starting, not a preempted node: retry soon, give up soon.
#: One site (and one leave-one-site-out fold) at a time (kfp.local would run two ParallelFor iterations
#: in threads): each site's ingest or fold's training already uses every core, and one step at a time
#: keeps each step's log lines together.
LOCAL = ClusterOptions(retries=2, backoff="5s", backoff_max="30s", parallel_sites=1, parallel_folds=1)


def run_local(name: str, arguments: dict[str, Any], *, pipeline_root: str | Path, cache: bool = True) -> None:
    """Run pipeline ``name`` to completion; raises when a step fails (after the exit handler ran)."""
    from kfp import local

    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {sorted(PIPELINES)}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(pipeline_root).resolve()),
               enable_caching=cache, raise_on_error=True)
    with warnings.catch_warnings():
        # base_image, resources and accelerators have no meaning in a local subprocess; kfp says so per step
        warnings.filterwarnings("ignore", message=".*(base image|no effect in the current local runner).*")
        PIPELINES[name](LOCAL)(**arguments)
