"""Where the registry stands: the newest version, which versions hold the aliases, and the newest
version's evaluation (downloaded from its registration run). What ``pe-triage demo`` reports after
a retraining run, read from the tracking server rather than from pipeline internals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pe_triage.config import RegistryConfig
from pe_triage.registry.registry import (
    CHALLENGER,
    CHAMPION,
    EVALUATION_DIR,
    METRICS_FILE,
    PREVIOUS,
    RegistryError,
    registry_client,
)


def registry_overview(dst: str | Path, *, config: RegistryConfig = RegistryConfig(), uri: str | None = None) -> dict[str, Any]:
    """``{"name", "latest": version, "aliases": {alias: version}, "decision": the latest version's last
    registry decision (reason), "gates": that decision's gate results (``[]`` when none were
    evaluated), "metrics": metrics.json of the latest version, "evaluation": local folder}``; the
    latest version's evaluation folder is downloaded into ``dst``."""
    import mlflow.artifacts

    client = registry_client(uri)
    versions = client.search_model_versions(f"name = '{config.model_name}'")
    if not versions:
        raise RegistryError(f"model {config.model_name!r} has no versions")
    latest = max(versions, key=lambda v: int(v.version))
    aliases = {a: int(v) for a, v in client.get_registered_model(config.model_name).aliases.items()
               if a in (CHAMPION, CHALLENGER, PREVIOUS)}
    folder = mlflow.artifacts.download_artifacts(run_id=latest.run_id, artifact_path=EVALUATION_DIR, dst_path=str(dst),
                                                 tracking_uri=client.tracking_uri)
    tags = client.get_model_version(config.model_name, latest.version).tags
    return {"name": config.model_name, "latest": int(latest.version), "run_id": latest.run_id, "aliases": aliases,
            "decision": tags.get("last_decision.reason"), "gates": json.loads(tags.get("last_decision.gates") or "[]"),
            "metrics": json.loads((Path(folder) / METRICS_FILE).read_text()), "evaluation": folder}
