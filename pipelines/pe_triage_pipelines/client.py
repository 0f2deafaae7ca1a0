"""Submit a pipeline run, or create the recurring retraining run, on a Kubeflow Pipelines server.

Authentication is the KFP client's: in-cluster ServiceAccount tokens (``KF_PIPELINES_SA_TOKEN_PATH``),
or the credentials of the environment it runs in.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from pe_triage_pipelines.cluster import ClusterOptions
from pe_triage_pipelines.compile import compile_pipeline

log = logging.getLogger(__name__)


def _client(host: str, namespace: str | None) -> Any:
    import kfp

    return kfp.Client(host=host, namespace=namespace) if namespace else kfp.Client(host=host)


def submit(host: str, name: str, arguments: dict[str, Any], *, experiment: str, run_name: str | None = None,
           namespace: str | None = None, options: ClusterOptions = ClusterOptions()) -> str:
    """Compile pipeline ``name`` and start one run of it; returns the run id."""
    client = _client(host, namespace)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(name, Path(tmp) / f"{name}.yaml", options)
        result = client.create_run_from_pipeline_package(str(package), arguments=arguments, run_name=run_name,
                                                         experiment_name=experiment, namespace=namespace)
    log.info("submitted %s run %s", name, result.run_id)
    return str(result.run_id)


def _recurring_runs(client: Any, experiment_id: str, name: str) -> list[Any]:
    flt = json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": name}]})
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, experiment_id=experiment_id, filter=flt)
        found += [r for r in page.recurring_runs or [] if r.display_name == name]
        token = page.next_page_token
        if not token:
            return found


def schedule(host: str, arguments: dict[str, Any], *, cron: str, name: str, experiment: str,
             namespace: str | None = None, options: ClusterOptions = ClusterOptions()) -> str:
    """Create the recurring retraining run ``name`` (one run at a time, no catch-up of missed
    slots), replacing any earlier one of that name: the new one is created before the old ones
    are deleted, so there is never a moment without a schedule. Returns its id."""
    client = _client(host, namespace)
    exp = client.create_experiment(experiment, namespace=namespace)  # returns the existing one if any
    old = _recurring_runs(client, exp.experiment_id, name)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline("retraining", Path(tmp) / "retraining.yaml", options)
        created = client.create_recurring_run(exp.experiment_id, name, cron_expression=cron, max_concurrency=1, no_catchup=True,
                                              params=arguments, pipeline_package_path=str(package), enabled=True)
    for run in old:
        client.delete_recurring_run(run.recurring_run_id)
        log.info("replaced recurring run %s", run.recurring_run_id)
    log.info("recurring run %s (%s): %s", name, created.recurring_run_id, cron)
    return str(created.recurring_run_id)
