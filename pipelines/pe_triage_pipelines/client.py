"""Submit a pipeline run, or create the recurring retraining run, on a Kubeflow Pipelines server.
Both run a *named pipeline version* (package version + content hash of the compiled YAML), uploaded
once and reused after, so the KFP UI lists each code/cluster-option change as a version of its pipeline.

Authentication is the KFP client's: in-cluster ServiceAccount tokens (``KF_PIPELINES_SA_TOKEN_PATH``),
or the credentials of the environment it runs in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pe_triage import __version__
from pe_triage_pipelines.cluster import ClusterOptions
from pe_triage_pipelines.compile import compile_pipeline

log = logging.getLogger(__name__)


def _client(host: str, namespace: str | None) -> Any:
    import kfp

    return kfp.Client(host=host, namespace=namespace) if namespace else kfp.Client(host=host)


def version_name(package: Path) -> str:
    """The pipeline version's name: the package version and a content hash of the compiled YAML, so
    the same code and cluster options give the same name, and any change a new one."""
    return f"{__version__}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"


def _by_name(name: str) -> str:
    return json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": name}]})


def upload_version(client: Any, package: Path, namespace: str | None = None) -> tuple[str, str]:
    """(pipeline id, version id) of ``package`` as a named version of its pipeline (the pipeline is
    created on first use, in ``namespace`` on multi-user Kubeflow): an existing version of that name
    is reused, never uploaded twice."""
    pipeline_name = next(yaml.safe_load_all(package.read_text()))["pipelineInfo"]["name"]
    version = version_name(package)
    pipelines = client.list_pipelines(page_size=1, filter=_by_name(pipeline_name), namespace=namespace).pipelines or []
    if pipelines:
        pipeline_id = pipelines[0].pipeline_id
    else:  # its first version carries the pipeline's name; runs use the named one below
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=pipeline_name, namespace=namespace).pipeline_id
    found = client.list_pipeline_versions(pipeline_id, page_size=1, filter=_by_name(version)).pipeline_versions or []
    if found:
        log.info("%s: version %s exists, reused", pipeline_name, version)
        return str(pipeline_id), str(found[0].pipeline_version_id)
    created = client.upload_pipeline_version(str(package), version, pipeline_id=pipeline_id)
    log.info("%s: uploaded version %s", pipeline_name, version)
    return str(pipeline_id), str(created.pipeline_version_id)


def submit(host: str, name: str, arguments: dict[str, Any], *, experiment: str, run_name: str | None = None,
           namespace: str | None = None, options: ClusterOptions = ClusterOptions()) -> str:
    """Compile pipeline ``name``, upload it as a named version (or reuse that version) and start one
    run of that version; returns the run id."""
    client = _client(host, namespace)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(name, Path(tmp) / f"{name}.yaml", options)
        pipeline_id, version_id = upload_version(client, package, namespace)
        run_name = run_name or f"{name} {version_name(package)}"
    exp = client.create_experiment(experiment, namespace=namespace)
    result = client.run_pipeline(exp.experiment_id, run_name, params=arguments, pipeline_id=pipeline_id, version_id=version_id)
    log.info("submitted %s run %s", name, result.run_id)
    return str(result.run_id)


def _recurring_runs(client: Any, experiment_id: str, name: str) -> list[Any]:
    flt = _by_name(name)
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, experiment_id=experiment_id, filter=flt)
        found += [r for r in page.recurring_runs or [] if r.display_name == name]
        token = page.next_page_token
        if not token:
            return found


def schedule(host: str, arguments: dict[str, Any], *, cron: str, name: str, experiment: str,
             namespace: str | None = None, options: ClusterOptions = ClusterOptions()) -> str:
    """Create the recurring retraining run ``name`` of the retraining pipeline's named version (one
    run at a time, no catch-up of missed slots), replacing any earlier one of that name: the new one
    is created before the old ones are deleted, so there is never a moment without a schedule.
    Returns its id."""
    client = _client(host, namespace)
    exp = client.create_experiment(experiment, namespace=namespace)  # returns the existing one if any
    old = _recurring_runs(client, exp.experiment_id, name)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline("retraining", Path(tmp) / "retraining.yaml", options)
        pipeline_id, version_id = upload_version(client, package, namespace)
    created = client.create_recurring_run(exp.experiment_id, name, cron_expression=cron, max_concurrency=1, no_catchup=True,
                                          params=arguments, pipeline_id=pipeline_id, version_id=version_id, enabled=True)
    for run in old:
        client.delete_recurring_run(run.recurring_run_id)
        log.info("replaced recurring run %s", run.recurring_run_id)
    log.info("recurring run %s (%s): %s", name, created.recurring_run_id, cron)
    return str(created.recurring_run_id)
