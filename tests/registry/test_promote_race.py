"""Champion moves are serialised (issue 16, defect 5), against a real ``mlflow server``: two promotes
that observed the same champion, in threads or in processes, leave exactly one winner, the other a
conflict naming it (CLI exit 1); the lock excludes, recovers from a dead holder and names a live one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from test_predict import stage_model
from test_registry import write_metrics

from pe_triage.config import RegistryConfig
from pe_triage.registry import registry
from pe_triage.registry.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    REPLACED_TAG,
    RegistryError,
    load_registered,
    promote,
    register,
    rollback,
)


def conflict(e: Exception) -> bool:
    """A promotion conflict (checked by name: the class is new with the lock)."""
    return isinstance(e, RegistryError) and type(e).__name__ == "PromotionConflict"


def lock_entries(tags: dict[str, str]) -> list[str]:
    return [k for k in tags if k.startswith("lock.")]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("race-models")
    return str(stage_model(root / "stage1", 1, threshold=0.45)), str(stage_model(root / "stage2", 2, threshold=0.5))


def three_versions(uri: str, cfg: RegistryConfig, pair: tuple[str, str], tmp_path: Path) -> None:
    """Version 1 champion; versions 2 and 3 each pass every gate against it."""
    for i in (1, 2, 3):
        register(*pair, str(write_metrics(tmp_path / f"m{i}", pe=0.95 + i / 100)), config=cfg, uri=uri)
    assert promote(1, config=cfg, uri=uri)["promoted"]


def observed_together(monkeypatch: pytest.MonkeyPatch, parties: int) -> None:
    """Each thread's first read of the champion waits for the others': they all start from the same one."""
    barrier, real, seen = threading.Barrier(parties), registry._alias, threading.local()

    def synced(client: Any, name: str, alias: str) -> Any:
        found = real(client, name, alias)
        if alias == CHAMPION and not getattr(seen, "done", False):
            seen.done = True
            barrier.wait(timeout=120)
        return found

    monkeypatch.setattr(registry, "_alias", synced)


def assert_consistent(uri: str, cfg: RegistryConfig, winner: int) -> None:
    """The winner is champion, version 1 its previous, the chain and the records agree."""
    client = MlflowClient(uri)
    model, loser = client.get_registered_model(cfg.model_name), 5 - winner
    aliases = dict(model.aliases)
    assert aliases.pop("challenger", str(loser)) == str(loser)  # version 3, the latest registered, unless it won
    assert aliases == {CHAMPION: str(winner), PREVIOUS: "1"}
    assert client.get_model_version(cfg.model_name, str(winner)).tags[REPLACED_TAG] == "1"
    assert lock_entries(model.tags) == []  # every lock entry released
    tags = client.get_model_version(cfg.model_name, str(loser)).tags
    assert tags["last_decision.outcome"] == "conflict" and f"version {winner}" in tags["last_decision.reason"]
    assert load_registered(f"models:/{cfg.model_name}@{CHAMPION}", uri=uri)[1] == winner


def test_two_promotes_in_threads_leave_one_winner(mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    three_versions(mlflow_server, cfg, pair, tmp_path)
    observed_together(monkeypatch, 2)

    def attempt(version: int) -> dict[str, Any] | Exception:
        try:
            return promote(version, config=cfg, uri=mlflow_server)
        except RegistryError as e:
            return e

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(attempt, (2, 3)))
    won = [r for r in results if isinstance(r, dict) and r["outcome"] == "promoted"]
    lost = [r for r in results if isinstance(r, Exception) and conflict(r)]
    assert len(won) == 1 and len(lost) == 1, results
    winner = won[0]["version"]
    assert won[0]["champion_before"] == 1 and f"version {winner}" in str(lost[0])
    assert_consistent(mlflow_server, cfg, winner)


SYNCED_CLI = """
import os, sys, time
from pathlib import Path
from pe_triage.registry import registry as R
real, state, gate = R._alias, {}, Path(sys.argv[1])
def synced(client, name, alias):
    found = real(client, name, alias)
    if alias == R.CHAMPION and not state:
        state["done"] = True
        (gate / str(os.getpid())).touch()
        deadline = time.monotonic() + 300
        while len(list(gate.iterdir())) < int(sys.argv[2]) and time.monotonic() < deadline:
            time.sleep(0.02)
    return found
R._alias = synced
from pe_triage.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_two_promote_processes_leave_one_winner_and_the_loser_exits_1(
        mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str], tmp_path: Path) -> None:
    three_versions(mlflow_server, cfg, pair, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(f"registry:\n  model_name: {cfg.model_name}\n  experiment: {cfg.experiment}\n")
    (tmp_path / "gate").mkdir()
    procs = {v: subprocess.Popen([sys.executable, "-c", SYNCED_CLI, str(tmp_path / "gate"), "2", "promote", "--version",
                                  str(v), "--config", str(config), "--tracking-uri", mlflow_server],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=os.environ | {"OMP_NUM_THREADS": "1"})
             for v in (2, 3)}
    done = {v: (p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for v, p in procs.items()}  # type: ignore[union-attr]
    codes = sorted(code for code, _, _ in done.values())
    assert codes == [0, 1], {v: (c, err[-2000:]) for v, (c, _, err) in done.items()}
    winner = next(v for v, (code, _, _) in done.items() if code == 0)
    loser_err = done[5 - winner][2]
    assert json.loads(done[winner][1])["champion_before"] == 1
    conflict = [line for line in loser_err.splitlines() if "conflict" in line]
    assert len(conflict) == 1 and f"version {winner}" in conflict[0] and "Traceback" not in loser_err
    assert_consistent(mlflow_server, cfg, winner)


def test_a_promote_and_a_rollback_started_together_do_not_both_act(
        mlflow_server: str, cfg: RegistryConfig, pair: tuple[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    three_versions(mlflow_server, cfg, pair, tmp_path)
    assert promote(2, config=cfg, uri=mlflow_server)["promoted"]  # champion 2, previous 1
    observed_together(monkeypatch, 2)

    def attempt(action: str) -> dict[str, Any] | Exception:
        try:
            return promote(3, config=cfg, uri=mlflow_server) if action == "promote" else rollback(config=cfg, uri=mlflow_server)
        except RegistryError as e:
            return e

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(attempt, ("promote", "rollback")))
    assert sum(isinstance(r, Exception) and conflict(r) for r in results) == 1, results
    aliases = dict(MlflowClient(mlflow_server).get_registered_model(cfg.model_name).aliases)
    # a rollback that wins leaves version 3 what its registration made it: the challenger
    assert aliases in ({CHAMPION: "3", PREVIOUS: "2"}, {CHAMPION: "1", CHALLENGER: "3"})
    assert load_registered(f"models:/{cfg.model_name}@{CHAMPION}", uri=mlflow_server)[1] == int(aliases[CHAMPION])


def test_the_lock_excludes_threads_on_a_read_modify_write(mlflow_server: str, cfg: RegistryConfig) -> None:
    from pe_triage.registry.lock import champion_lock

    cfg = replace(cfg, lock_poll_s=0.05)
    client = MlflowClient(mlflow_server)
    client.create_registered_model(cfg.model_name)
    client.set_registered_model_tag(cfg.model_name, "counter", "0")
    inside, overlaps = [0], [0]

    def bump(i: int) -> None:
        for _ in range(3):
            with champion_lock(client, cfg.model_name, cfg, actor=f"t{i}", action="count"):
                inside[0] += 1
                overlaps[0] += inside[0] > 1
                value = int(client.get_registered_model(cfg.model_name).tags["counter"])
                time.sleep(0.01)
                client.set_registered_model_tag(cfg.model_name, "counter", str(value + 1))
                inside[0] -= 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(bump, range(4)))
    tags = client.get_registered_model(cfg.model_name).tags
    assert tags["counter"] == "12" and overlaps == [0]
    assert lock_entries(tags) == []


def test_a_dead_holder_is_recovered_and_a_live_one_is_named(mlflow_server: str, cfg: RegistryConfig,
                                                            pair: tuple[str, str], tmp_path: Path) -> None:
    from pe_triage.registry.lock import LOCK_PREFIX, champion_lock
    from pe_triage.registry.registry import PromotionConflict

    register(*pair, str(write_metrics(tmp_path / "m")), config=cfg, uri=mlflow_server)
    client = MlflowClient(mlflow_server)
    dead = {"state": "ticket", "n": 1, "actor": "ghost", "action": "promote 9", "time": time.time() - 3600}
    client.set_registered_model_tag(cfg.model_name, f"{LOCK_PREFIX}deadbeef", json.dumps(dead))  # a killed promote's entry
    assert promote(config=cfg, uri=mlflow_server)["promoted"]
    assert lock_entries(client.get_registered_model(cfg.model_name).tags) == []

    register(*pair, str(write_metrics(tmp_path / "m2", pe=0.96)), config=cfg, uri=mlflow_server)
    with champion_lock(client, cfg.model_name, cfg, actor="dave", action="rollback"):
        started = time.monotonic()
        with pytest.raises(PromotionConflict, match=r"dave.*rollback"):
            promote(config=replace(cfg, lock_wait_s=1.0), uri=mlflow_server)
        assert time.monotonic() - started < 30
    assert promote(config=cfg, uri=mlflow_server)["promoted"]
