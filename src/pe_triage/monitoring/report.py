"""The drift report's files (``drift.json``, ``drift.md``, ``drift.html``, built from the evaluation
report's blocks) and the ``pe-triage monitor`` run: read, compare, write, log to MLflow."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from pe_triage.config import Config
from pe_triage.evaluation.report import Image, Section, Table, _figure, _png, _write_documents
from pe_triage.monitoring.drift import drift_metrics, drift_report, reference_acquisition, score_histograms
from pe_triage.monitoring.store import MonitorStore
from pe_triage.tracking import start_run


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _feature_table(caption: str, features: dict[str, Any]) -> Table:
    return Table(caption, ["feature", "PSI", "KS", "value", "reference", "flagged"],
                 [[name, _cell(v.get("psi")), _cell(v.get("ks")), _cell(v.get("value")), _cell(v.get("reference")),
                   "yes" if v["flagged"] else "no"] for name, v in features.items()])


def _plot(hists: dict[str, np.ndarray]) -> bytes:
    fig = _figure(7.0, 3.5)
    ax = fig.subplots()
    for name, v in hists.items():
        if v.size:
            ax.hist(v, bins=np.linspace(0, 1, 21), histtype="step", linewidth=1.5, weights=np.full(v.size, 1 / v.size),
                    label=f"{name} (n={v.size})")
    ax.set_xlabel("per-study max P(PE)")
    ax.set_ylabel("fraction of studies")
    ax.legend(fontsize=8)
    return _png(fig)


def _blocks(report: dict[str, Any], png: bytes) -> list[Any]:
    t = report["thresholds"]
    blocks: list[Any] = [
        f"{report['studies']} studies from {report['since']} to {report['until'] or 'today'}, model version(s) "
        f"{', '.join(report['model_versions'])}; reference: {report['reference_studies']} training studies. "
        f"Flagged: PSI > {t['psi']} (and KS > {t['ks']} for numbers), HU bin masses PSI > {t['hu_psi']} (value and "
        f"reference: their soft-tissue median HU), flag rate change > {t['flag_rate_delta']}.",
        Table("Sites", ["site", "studies", "flag rate", "flagged"],
              [[s, str(v["studies"]), _cell(v["flag_rate"]), ", ".join(v["flagged"]) or "none"]
               for s, v in report["sites"].items()]),
        Image("scores", "Per-study max P(PE) by site", png, "scores.png"),
    ]
    for site, v in report["sites"].items():
        inner: list[Any] = [_feature_table("Input drift (acquisition fields vs. the training data)", v["input"])]
        out = v["output"]
        inner.append(_feature_table(f"Output drift (vs. {out['reference']})", out["features"]) if out["assessed"]
                     else f"Output drift not assessed: {out['reason']}.")
        blocks.append(Section(f"Site {site}", inner))
    return blocks


def run_monitor(config: Config, *, since: date, until: date | None, reference: str, out_dir: str,
                tracking_uri: str | None = None) -> dict[str, Any]:
    """Read the store, compare, write the report into ``out_dir`` and log it (when tracking is set)."""
    store = MonitorStore(config.monitor.store)
    records = store.read(since, until)
    history = store.read(None, None)
    history = history[history["time"].dt.date < since] if len(history) else history
    ref = reference_acquisition(reference, config.monitor, config.preprocess.crop)
    report = drift_report(records, history, ref, config.monitor, since=since, until=until)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = _plot(score_histograms(records, history))
    (out / "scores.png").write_bytes(png)
    _write_documents(report, _blocks(report, png), out, "drift", "drift", "PE triage: drift report")
    with start_run(experiment=config.registry.experiment, run_name=f"drift-{since.isoformat()}",
                   tags={"pe_triage.kind": "drift"}, uri=tracking_uri) as tracker:
        tracker.log_params({"since": since.isoformat(), "until": str(until), "reference": reference})
        tracker.log_metrics(drift_metrics(report))
        tracker.log_artifacts(out, "drift")
    return report
