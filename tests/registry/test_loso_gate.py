"""The leave-one-site-out gate (``gates.max_site_auroc_drop``): on metric summaries, and enforced by
``promote`` against a real MLflow server, from the library and from the command line, on the summary
the version was registered with."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from test_gates import metrics
from test_registry import cli, write_metrics

from pe_triage.config import GateConfig, RegistryConfig
from pe_triage.evaluation.loso import SUMMARY_FILE
from pe_triage.registry.registry import (
    CHAMPION,
    LOSO_KEY,
    RegistryError,
    evaluate_gates,
    promote,
    register,
)

#: the test data ``write_metrics`` records: the drops must be measured against it
POOLED = {"windows_digest": "windows-A", "splits_digest": "sd-1", "split": "test", "fold": "default", "slices": 120,
          "patients": 6}


def loso(drop: float | None, *, skipped: str | None = None) -> dict[str, Any]:
    worst = None if drop is None else {"site": "site-c", "metric": "slice_stage1_auroc", "drop": drop}
    drops = {} if drop is None else {"site-c": {"slice_stage1_auroc": drop, "patient_pe_sensitivity": 0.02}}
    return {"skipped": skipped, "worst": worst, "pooled_test_data": POOLED, "folds": {}, "drops": drops}


def write_loso(folder: Path, drop: float | None, **kw: Any) -> str:
    folder.mkdir(parents=True)
    (folder / SUMMARY_FILE).write_text(json.dumps(loso(drop, **kw)))
    (folder / "leave_one_site_out.html").write_text("<html></html>")
    return str(folder)


def verdict(summary: dict[str, Any], config: RegistryConfig = RegistryConfig()) -> list[tuple[str, bool]]:
    gates = evaluate_gates(metrics() | {LOSO_KEY: summary}, None, config)
    return [(g.name, g.passed) for g in gates if g.name == "max_site_auroc_drop"]


def test_the_worst_site_drop_is_bounded_by_the_configured_gate() -> None:
    assert GateConfig().max_site_auroc_drop == 0.10
    assert verdict(loso(0.04)) == [("max_site_auroc_drop", True)]
    assert verdict(loso(0.10)) == [("max_site_auroc_drop", True)]  # at the threshold passes
    assert verdict(loso(0.18)) == [("max_site_auroc_drop", False)]
    assert verdict(loso(None)) == [("max_site_auroc_drop", False)]  # folds ran but measured nothing gated
    assert verdict(loso(None, skipped="2 site(s), fewer than loso.min_sites 3")) == [("max_site_auroc_drop", True)]
    assert verdict(loso(0.18), RegistryConfig(gates=GateConfig(max_site_auroc_drop=0.2))) == [("max_site_auroc_drop", True)]
    assert verdict(loso(0.5), RegistryConfig(gates=GateConfig(max_site_auroc_drop=None))) == []  # off
    assert [g.name for g in evaluate_gates(metrics(), None, RegistryConfig())].count("max_site_auroc_drop") == 0
    (gate,) = [g for g in evaluate_gates(metrics() | {LOSO_KEY: loso(0.18)}, None, RegistryConfig())
               if g.name == "max_site_auroc_drop"]
    assert "site-c" in gate.detail and "slice_stage1_auroc" in gate.detail and gate.value == 0.18


def test_promote_refuses_a_version_whose_worst_site_dropped_too_far(mlflow_server: str, cfg: RegistryConfig,
                                                                    pair: tuple[str, str], tmp_path: Path) -> None:
    shifted = register(*pair, str(write_metrics(tmp_path / "m1")), config=cfg, uri=mlflow_server,
                       loso=write_loso(tmp_path / "loso1", 0.25))
    version = MlflowClient(mlflow_server).get_model_version(cfg.model_name, str(shifted["version"]))
    assert version.tags["loso.worst_site"] == "site-c" and version.tags["loso.worst_drop"] == "0.25"
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(version.run_id, f"evaluation/{LOSO_KEY}")}
    assert f"evaluation/{LOSO_KEY}/{SUMMARY_FILE}" in artifacts
    card = Path(MlflowClient(mlflow_server).download_artifacts(version.run_id, "model_card.md", str(tmp_path))).read_text()
    assert "## Leave one site out" in card and "slice_stage1_auroc at site-c" in card
    refused = promote(config=cfg, uri=mlflow_server)
    assert refused["outcome"] == "refused" and "gate max_site_auroc_drop failed" in refused["reason"]
    assert "site-c" in refused["reason"]
    ok = register(*pair, str(write_metrics(tmp_path / "m2")), config=cfg, uri=mlflow_server,
                  loso=write_loso(tmp_path / "loso2", 0.03))
    assert promote(config=cfg, uri=mlflow_server)["outcome"] == "promoted"
    assert MlflowClient(mlflow_server).get_registered_model(cfg.model_name).aliases[CHAMPION] == str(ok["version"])
    with pytest.raises(RegistryError, match="other test data"):  # drops measured against another evaluation
        register(*pair, str(write_metrics(tmp_path / "m3", test="windows-B")), config=cfg, uri=mlflow_server,
                 loso=write_loso(tmp_path / "loso3", 0.03))


def test_promote_by_hand_on_the_command_line_enforces_it(mlflow_server: str, cfg: RegistryConfig,
                                                         pair: tuple[str, str], tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"registry:\n  model_name: {cfg.model_name}\n  experiment: {cfg.experiment}\n")
    common = ["--config", str(config), "--tracking-uri", mlflow_server]
    assert cli("register", "--stage1", pair[0], "--stage2", pair[1], "--metrics", str(write_metrics(tmp_path / "m")),
               "--loso", write_loso(tmp_path / "loso", 0.3), *common) == 0
    with caplog.at_level(logging.ERROR):
        assert cli("promote", *common) == 1
    assert "gate max_site_auroc_drop failed" in caplog.text


def sensitivity_drops(**by_site: float | None) -> dict[str, Any]:
    """A summary whose AUROCs held (drop 0.02) and whose sites lost these amounts of PE sensitivity."""
    drops = {site: {"slice_stage1_auroc": 0.02, "patient_pe_sensitivity": d} for site, d in by_site.items()}
    return loso(0.02) | {"drops": drops}


def test_a_site_where_the_fold_misses_pe_fails_even_when_its_aurocs_held() -> None:
    """Measured (benchmarks/loso_shift.py, 96 px): a shifted site's fold kept its slice AUROC drop
    below the unshifted sites' noise, while its PE sensitivity fell by 0.61 (unshifted sites <= 0.09)."""
    name = "max_site_pe_sensitivity_drop"
    gates = {g.name: g for g in evaluate_gates(metrics() | {LOSO_KEY: sensitivity_drops(**{"site-a": 0.05, "site-c": 0.61})},
                                               None, RegistryConfig())}
    assert GateConfig().max_site_pe_sensitivity_drop == 0.15
    assert gates["max_site_auroc_drop"].passed and not gates[name].passed
    assert gates[name].value == pytest.approx(0.61) and "site-c" in gates[name].detail
    near = sensitivity_drops(**{"site-a": 0.09, "site-c": 0.15})
    held = {g.name: g.passed for g in evaluate_gates(metrics() | {LOSO_KEY: near}, None, RegistryConfig())}
    assert held[name]  # at the threshold passes
    unmeasured = {g.name: g.passed for g in evaluate_gates(metrics() | {LOSO_KEY: sensitivity_drops(**{"site-a": None})},
                                                           None, RegistryConfig())}
    assert not unmeasured[name]  # no site had PE patients to measure: not a pass
    off = RegistryConfig(gates=GateConfig(max_site_pe_sensitivity_drop=None))
    assert name not in {g.name for g in evaluate_gates(metrics() | {LOSO_KEY: sensitivity_drops(**{"site-c": 0.61})}, None, off)}
    skipped = {g.name: g.passed for g in evaluate_gates(metrics() | {LOSO_KEY: loso(None, skipped="loso.enabled is false")},
                                                        None, RegistryConfig())}
    assert skipped[name]
