"""What makes a registered version trustworthy at load: its files are the ones registered, and a
champion alias was put there by a recorded passing decision.

Who can write what decides where each record lives. The artifact store (the run's files: the model,
its evaluation) is writable by whoever can write the experiment or reach the bucket; the registry's
tags only through the registry API. So at registration every artifact file's sha256 goes into a tag
of the model version (:data:`MANIFEST_TAG`), and a file changed, added or removed in the store
afterwards is refused by name. Every champion move (promote, rollback) writes the decision behind it
to a tag of the registered model (:data:`CHAMPION_DECISION_TAG`) before it moves the alias; a
champion alias that this record does not explain was moved outside pe-triage and is refused.
Neither protects against someone who may write registry tags: that is the registry's access control.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pe_triage.config import RegistryConfig
from pe_triage.registry.errors import IntegrityError
from pe_triage.registry.lock import moving

#: model version tag: JSON ``{artifact path: sha256}`` of every file the registration logged
MANIFEST_TAG = "integrity.manifest"
#: registered model tag: the decision (JSON) behind the current champion alias
CHAMPION_DECISION_TAG = "champion.decision"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(local: Path, artifact_path: str) -> dict[str, Path]:
    """Artifact path -> local file, for a file or every file under a folder (as MLflow walks it)."""
    if local.is_file():
        return {artifact_path: local}
    found = {}
    for folder, _, names in os.walk(local):
        for file in names:
            rel = (Path(folder) / file).relative_to(local).as_posix()
            found[f"{artifact_path}/{rel}" if artifact_path else rel] = Path(folder) / file
    return found


def manifest(logged: Iterable[tuple[Path, str]]) -> dict[str, str]:
    """sha256 of every file that is logged, given as (local file or folder, its artifact path)."""
    return {key: sha256_file(path) for local, artifact_path in logged
            for key, path in sorted(_files(local, artifact_path).items())}


def _recorded(name: str, version: Any) -> dict[str, str]:
    raw = version.tags.get(MANIFEST_TAG)
    try:
        recorded = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict) or not recorded:
        raise IntegrityError(f"{name} version {version.version} has no readable integrity record ({MANIFEST_TAG}): it was "
                             "not registered by pe-triage register, so nothing vouches for its files; refusing to use it")
    return recorded


def verify(name: str, version: Any, local: Path, artifact_path: str) -> Path:
    """Check the downloaded ``artifact_path`` of ``version`` (at ``local``) against the version's
    manifest: the same files, each with its registered digest. Returns ``local``."""
    expected = {k: v for k, v in _recorded(name, version).items()
                if k == artifact_path or k.startswith(f"{artifact_path}/")}
    found = {key: sha256_file(path) for key, path in _files(local, artifact_path).items()}
    problems = [f"{k} (digest differs)" for k in sorted(found.keys() & expected.keys()) if found[k] != expected[k]]
    problems += [f"{k} (not registered)" for k in sorted(found.keys() - expected.keys())]
    problems += [f"{k} (missing)" for k in sorted(expected.keys() - found.keys())]
    if problems or not expected:
        raise IntegrityError(f"{name} version {version.version} has artifacts that changed since registration: "
                             f"{', '.join(problems) or f'nothing registered under {artifact_path}'}; refusing to use it")
    return local


def download_verified(client: Any, name: str, version: Any, artifact_path: str, dst: str | Path) -> Path:
    """Download ``artifact_path`` (file or folder) of the version's registration run into ``dst`` and
    :func:`verify` it; the version must have been registered from that run's ``model`` folder."""
    import mlflow.artifacts

    _recorded(name, version)  # before any download: a version without a record is refused outright
    if not version.run_id or version.source != f"runs:/{version.run_id}/model":
        raise IntegrityError(f"{name} version {version.version} was registered from {version.source!r}, not from its "
                             "registration run's model folder; refusing to use it")
    local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact_path, dst_path=str(dst),
                                                tracking_uri=client.tracking_uri)
    return verify(name, version, Path(local), artifact_path)


# ------------------------------------------------------------------------------- the champion alias
def record_champion(client: Any, name: str, decision: Mapping[str, Any]) -> None:
    """Record the decision that puts ``decision["champion"]`` in place (before the alias moves)."""
    keep = ("action", "outcome", "champion", "champion_before", "actor", "time", "reason")
    record = {k: decision.get(k) for k in keep} | {"gates_passed": all(g["passed"] for g in decision.get("gates", []))}
    client.set_registered_model_tag(name, CHAMPION_DECISION_TAG, json.dumps(record, sort_keys=True))


def champion_record(tags: Mapping[str, str]) -> dict[str, Any] | None:
    try:
        record = json.loads(tags.get(CHAMPION_DECISION_TAG) or "null")
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def explains(record: Mapping[str, Any] | None, version: int | str) -> bool:
    """Does the recorded decision put ``version`` in place: a promotion that passed every gate, or a
    rollback that restored it?"""
    if not record or str(record.get("champion")) != str(version):
        return False
    promoted = record.get("action") == "promote" and record.get("outcome") == "promoted" and record.get("gates_passed")
    return bool(promoted or (record.get("action") == "rollback" and record.get("outcome") == "restored"))


def describe(record: Mapping[str, Any] | None) -> str:
    if not record:
        return "none (no promote or rollback was ever recorded)"
    return (f"{record.get('action')} of version {record.get('champion')} by {record.get('actor')} at {record.get('time')} "
            f"({record.get('outcome')})")


def explained_champion(client: Any, name: str, config: RegistryConfig) -> int:
    """The champion's version, once the recorded decision explains it. While a move is under way (a
    lock entry is held) alias and record may disagree for a moment: wait for it, up to ``lock_wait_s``."""
    deadline = time.monotonic() + config.lock_wait_s
    while True:
        model = client.get_registered_model(name)  # aliases and tags in one read
        version, record = model.aliases.get("champion"), champion_record(model.tags)
        if version is None:
            raise IntegrityError(f"model {name!r} has no champion")
        if explains(record, version):
            return int(version)
        if not moving(model.tags, config) or time.monotonic() > deadline:
            raise IntegrityError(f"{name}@champion points at version {version}, which no recorded decision put there: the "
                                 f"last recorded decision is {describe(record)}. The alias was moved outside pe-triage "
                                 "promote/rollback (or a move was interrupted); refusing to load it: promote a version "
                                 "through the gates or roll back")
        time.sleep(config.lock_poll_s)
