"""Leave one site out as a pipeline step and a promotion gate (issue 23).

Three calls, one per pipeline step: :func:`site_folds` lists the folds (one per site, that site's
patients the test split, the other sites' patients train/val), :func:`train_fold` trains, calibrates
and evaluates one fold exactly as the main model is (same configuration, same library calls), and
:func:`summarize` sets each held-out site against the main model's pooled test evaluation. The
summary's worst drop (:data:`WORST`) is what ``registry.gates.max_site_auroc_drop`` bounds.

The folds exist only when ``loso.enabled`` and the windows hold at least ``loso.min_sites`` sites;
otherwise the summary says why it was not run (never silently absent), and the gate passes on that
recorded reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads

from pe_triage import schema as S
from pe_triage.config import Config
from pe_triage.evaluation.evaluate import EvaluationError, evaluate, site_fold_summary
from pe_triage.evaluation.metrics import RATE_KEYS
from pe_triage.evaluation.operating_point import calibrate
from pe_triage.evaluation.report import write_loso_report
from pe_triage.splits import SplitError, split_dataset
from pe_triage.tracking import start_run
from pe_triage.training.train import train

log = logging.getLogger(__name__)

SUMMARY_FILE = "leave_one_site_out.json"
#: the summary key of the worst gated drop: {"site", "metric", "drop"}, or None when nothing was measured
WORST = "worst"
#: figures shown per held-out site beside the gated ones: the triage's exam-level sensitivities
SHOWN = ("slice_stage1_auroc", "slice_stage2_auroc", "patient_pe_sensitivity", "patient_disease_sensitivity")


def site_folds(windows: str, out: str, config: Config) -> tuple[list[str], str]:
    """(the site folds, "") with their splits written to ``out``, or ([], why not) when leave one
    site out is off, there are fewer than ``loso.min_sites`` sites, or the sites cannot make folds
    (a site without WNL or disease patients: :class:`~pe_triage.splits.SplitError`'s words)."""
    if not config.loso.enabled:
        return _none("loso.enabled is false")
    sites = sorted(pc.unique(pads.dataset(windows, format="parquet", partitioning="hive")
                             .to_table(columns=[S.SITE])[S.SITE].cast("string")).to_pylist())
    if len(sites) < config.loso.min_sites:
        return _none(f"{len(sites)} site(s), fewer than loso.min_sites {config.loso.min_sites}")
    try:
        report = split_dataset(windows, out, config=config.split, by_site=True)
    except SplitError as e:
        return _none(f"the sites cannot make leave-one-site-out folds: {e}")
    folds = sorted(report["folds"])
    log.info("leave one site out: %d folds (%s)", len(folds), ", ".join(folds))
    return folds, ""


def _none(reason: str) -> tuple[list[str], str]:
    log.info("leave one site out not run: %s", reason)
    return [], reason


def fold_config(config: Config) -> Config:
    """The main run's configuration without evidence maps: a fold is judged on its numbers only, and
    integrated gradients on a few hundred test slices would add minutes per fold for nothing shown."""
    return dataclasses.replace(config, evaluate=dataclasses.replace(config.evaluate, gradcam_per_category=0,
                                                                    gradcam_localisation=0))


def train_fold(windows: str, splits: str, fold: str, out: str, *, config: Config = Config(),
               tracking_uri: str | None = None, work: str | None = None) -> dict[str, Any]:
    """Both stages trained on ``fold``'s train/val (every site but ``fold``), the operating point set
    on its validation exams, the pair evaluated on the held-out site into ``out``: the metrics of
    that evaluation. Each step logs its own MLflow run tagged with the fold. The fold's models go to
    ``work`` (default: a temporary folder, removed): only their numbers are wanted, and four
    full-size models per site would be the largest artifacts of the run."""
    cfg = fold_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(work or tmp)
        for stage in (1, 2):
            train(windows, splits, str(root / f"stage{stage}"), stage=stage, config=cfg, fold=fold, tracking_uri=tracking_uri)
        calibrate(str(root / "stage1"), str(root / "stage2"), windows, splits, str(root / "calibrated1"),
                  str(root / "calibrated2"), fold=fold, config=cfg)
        return evaluate(str(root / "calibrated1"), str(root / "calibrated2"), windows, splits, out, split="test",
                        fold=fold, config=cfg, tracking_uri=tracking_uri)


def summarize(evaluations: list[str], pooled: str, out: str, *, config: Config = Config(), skipped: str = "",
              tracking_uri: str | None = None) -> dict[str, Any]:
    """The site folds' evaluations against the pooled test evaluation ``pooled`` (the main model's
    ``metrics.json`` folder): per-site figures, their drop, the worst gated drop; written to ``out``
    (JSON, Markdown, HTML) and logged as an MLflow run beside the main one. ``skipped``: why there
    are no folds (the summary then records only that)."""
    if skipped or not evaluations:
        summary: dict[str, Any] = {"skipped": skipped or "no site folds were evaluated", "folds": {}, WORST: None}
    else:
        summary = _with_drops(site_fold_summary(evaluations), _metrics(pooled), config)
    write_loso_report(summary, out)
    _log(summary, out, config, tracking_uri)
    return summary


def _metrics(folder: str) -> dict[str, Any]:
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise EvaluationError(f"{folder}: no metrics.json (the pooled test evaluation of the main model)")
    metrics: dict[str, Any] = json.loads(path.read_text())
    return metrics


def _with_drops(summary: dict[str, Any], pooled: dict[str, Any], config: Config) -> dict[str, Any]:
    """``summary`` plus pooled figures, each site's drop (pooled minus site: positive is worse) and
    the worst drop over the gated figures. A figure a site cannot measure (a class absent there) is
    listed as unmeasured and judged nowhere."""
    gated = tuple(config.loso.gate_metrics)
    if unknown := sorted(set(gated) - set(RATE_KEYS)):
        raise EvaluationError(f"loso.gate_metrics {unknown}: not evaluation figures (one of {list(RATE_KEYS)})")
    digests = {f: e.get("windows_digest") for f, e in summary["evaluations"].items()}
    if set(digests.values()) != {pooled["test_data"].get("windows_digest")}:
        raise EvaluationError(f"the site folds were evaluated on other windows than the pooled test split: {digests}")
    shown = list(dict.fromkeys([*gated, *SHOWN]))
    base = {k: pooled["summary"].get(k) for k in shown}
    drops = {site: {k: None if base[k] is None or fold.get(k) is None else float(base[k] - fold[k]) for k in shown}
             for site, fold in summary["folds"].items()}
    measured = [(d[k], site, k) for site, d in drops.items() for k in gated if d[k] is not None]
    worst = max(measured, default=None)
    return {**summary, "skipped": None, "pooled": base, "pooled_test_data": pooled["test_data"], "shown": shown,
            "gate_metrics": list(gated), "drops": drops,
            "unmeasured": [[site, k] for site, d in drops.items() for k in gated if d[k] is None],
            WORST: None if worst is None else {"drop": worst[0], "site": worst[1], "metric": worst[2]}}


def _log(summary: dict[str, Any], out: str, config: Config, tracking_uri: str | None) -> None:
    """One MLflow run in the main run's experiment: per-site figures and drops as metrics, the report as artifacts."""
    tags = {"step": "leave_one_site_out", "skipped": summary["skipped"] or "",
            "windows_digest": (summary.get("pooled_test_data") or {}).get("windows_digest")}
    with start_run(experiment=config.registry.experiment, run_name="leave-one-site-out", uri=tracking_uri,
                   tags=tags) as tracker:
        metrics: dict[str, float | None] = {}
        for site, drops in (summary.get("drops") or {}).items():
            metrics |= {f"{site}.{k}": summary["folds"][site].get(k) for k in drops}
            metrics |= {f"{site}.drop.{k}": v for k, v in drops.items()}
        if summary[WORST] is not None:
            metrics["worst_drop"] = summary[WORST]["drop"]
        tracker.log_metrics(metrics)
        tracker.log_artifacts(out, "leave_one_site_out")


def read_summary(folder: str) -> dict[str, Any]:
    """The summary :func:`summarize` wrote to ``folder``."""
    path = Path(folder) / SUMMARY_FILE
    if not path.is_file():
        raise EvaluationError(f"{folder}: no {SUMMARY_FILE} (not a leave-one-site-out summary)")
    summary: dict[str, Any] = json.loads(path.read_text())
    return summary
