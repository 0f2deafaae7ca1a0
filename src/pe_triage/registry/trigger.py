"""Retraining triggers (issue 23 item 4): does anything warrant a new model before the scheduled
pipeline spends GPU hours on one?

A new model is warranted when there is no champion, when the slices store is not the data the
champion was trained on (its version's ``dataset.slices_digest`` tag: new or relabelled studies, a new
site), or when the monitoring records since the champion's registration drift beyond the thresholds of
``MonitorConfig`` (when monitoring is configured). Otherwise the run is skipped, with the reason.
``force`` trains anyway. Each decision is an MLflow run in the ``-pipelines`` experiment, so the KFP
run and MLflow both say why a run trained or did not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pe_triage.config import Config
from pe_triage.monitoring.drift import drift_report, reference_acquisition
from pe_triage.monitoring.store import MonitorStore
from pe_triage.registry.registry import CHAMPION, _alias, registry_client
from pe_triage.tracking import Tracker, experiment_id_for, start_run, tracking_uri

#: ``pe_triage.kind`` of the decision runs
TRIGGER_KIND = "retrain_trigger"
#: digits of a digest shown in a reason (the full digest is in the details)
_SHORT = 12


@dataclass(frozen=True)
class Decision:
    """Whether to train, why (one sentence for the KFP log and MLflow), and the facts behind it."""

    train: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def should_retrain(store_digest: str, *, store: str, config: Config, uri: str | None, force: bool = False) -> Decision:
    """The decision for the slices store at ``store`` (digest ``store_digest``) against the champion."""
    facts: dict[str, Any] = {"slices_digest": store_digest, "forced": force}
    if force:
        return Decision(True, "forced: training was asked for regardless of the data (--force)", facts)
    if tracking_uri(uri) is None:
        return Decision(True, "no MLflow tracking URI: the champion cannot be read, so nothing says the data is old", facts)
    name = config.registry.model_name
    champion = _alias(registry_client(uri), name, CHAMPION)
    if champion is None:
        return Decision(True, f"no champion of {name} yet", facts)
    version, trained_on = int(champion.version), champion.tags.get("dataset.slices_digest")
    since = datetime.fromtimestamp(champion.creation_timestamp / 1000, UTC)
    facts |= {"champion_version": version, "champion_slices_digest": trained_on, "since": since.isoformat()}
    if not trained_on or trained_on == "None":
        return Decision(True, f"the champion (version {version}) records no slices digest: its training data "
                              "cannot be compared with the store", facts)
    if trained_on != store_digest:
        return Decision(True, f"new or changed labelled data: the slices store digest {store_digest[:_SHORT]} is not "
                              f"the champion's {trained_on[:_SHORT]} (version {version})", facts)
    drift = _drift(store, since, config)
    facts |= drift
    if drift.get("drifted_sites"):
        listed = "; ".join(f"{site}: {', '.join(features)}" for site, features in drift["drifted_sites"].items())
        return Decision(True, f"drift since {since:%Y-%m-%d %H:%M} UTC beyond the monitor thresholds ({listed})", facts)
    watched = (f"no drift in {drift['monitoring_records']} monitoring record(s) since {since:%Y-%m-%d %H:%M} UTC"
               if "monitoring_records" in drift else "drift not watched (monitor.store is not configured)")
    return Decision(False, f"skipped: nothing new: the slices store digest {store_digest[:_SHORT]} is the champion's "
                           f"(version {version}) and {watched}", facts)


def _drift(store: str, since: datetime, config: Config) -> dict[str, Any]:
    """The monitoring records since ``since`` against the champion's training data (the store, as the
    digests are equal): the flagged features per site. Empty without a monitoring store."""
    if not config.monitor.store:
        return {}
    monitor = MonitorStore(config.monitor.store)
    everything = monitor.read(since.date(), None)
    records = everything[everything["time"] >= since] if len(everything) else everything
    if records.empty:
        return {"monitoring_records": 0}
    history = monitor.read(None, since.date())
    history = history[history["time"] < since] if len(history) else history
    reference = reference_acquisition(store, config.monitor, config.preprocess.crop)
    report = drift_report(records, history, reference, config.monitor, since=since.date(), until=None)
    flagged = {site: s["flagged"] for site, s in report["sites"].items() if s["flagged"]}
    return {"monitoring_records": len(records), "drifted_sites": flagged}


def record_decision(decision: Decision, *, config: Config, uri: str | None, job: str = "") -> str | None:
    """Log ``decision`` as a run of the ``-pipelines`` experiment (tags: train, reason; params: the
    facts); its run id (None without tracking). ``job`` names the pipeline run that asked."""
    tags = {"pe_triage.kind": TRIGGER_KIND, "pe_triage.trigger.train": str(decision.train).lower(),
            "pe_triage.trigger.reason": decision.reason, "kfp.job": job or "-"}
    outcome = "train" if decision.train else "skip"
    with start_run(experiment=f"{config.registry.experiment}-pipelines", run_name=f"trigger: {outcome}", tags=tags,
                   uri=uri) as run:
        if not isinstance(run, Tracker):
            return None
        run.log_params({k: str(v) for k, v in decision.details.items() if k != "drifted_sites"})
        run.log_metrics({"train": float(decision.train)})
        return run.run_id


def recorded_skip(job: str, *, config: Config, uri: str | None) -> str | None:
    """The reason of the decision not to train recorded under ``job`` (None: trained, or none recorded),
    for the outcome run to say "skipped" rather than "succeeded"."""
    resolved = tracking_uri(uri)
    if resolved is None or "'" in job:
        return None
    client = registry_client(resolved)
    runs = client.search_runs([experiment_id_for(client, f"{config.registry.experiment}-pipelines")],
                              filter_string=f"tags.`pe_triage.kind` = '{TRIGGER_KIND}' and tags.`kfp.job` = '{job}'",
                              max_results=1)
    tags = runs[0].data.tags if runs else {}
    return tags.get("pe_triage.trigger.reason") if tags.get("pe_triage.trigger.train") == "false" else None
