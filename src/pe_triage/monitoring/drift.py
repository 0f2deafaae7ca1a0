"""``pe-triage monitor``: input and output drift of the monitoring records of a period.

Input drift: each site label's acquisition fields (one value per study) against the champion's
training data (the ``slices`` dataset it was trained on, one value per study), with the onboarding
report's statistics (:mod:`pe_triage.quality`: PSI on categories or reference deciles, KS on numbers).
Output drift: each site's per-study score summaries and flag rate against the records *before* the
period for the same model version(s) (the site's own when it has any, else all sites'): the first
weeks after a promotion are the reference, so nothing but the store is needed and the comparison is
between predictions of one model. Without earlier records output drift is reported as not assessed.
A numeric feature is flagged when PSI and KS both exceed their thresholds (PSI sizes the shift; KS
keeps a small day's sampling noise from flagging), a categorical one on PSI, the flag rate on its change.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from pe_triage import schema as S
from pe_triage.config import MonitorConfig
from pe_triage.monitoring.store import ACQUISITION
from pe_triage.quality import _compare
from pe_triage.storage import location

#: acquisition fields compared as numbers (the others as categories)
NUMERIC = {S.KVP, S.PIXEL_SPACING_ROW, S.SLICE_THICKNESS}
#: per-study score summaries compared for output drift
SCORES = (f"{S.P_DISEASE}_max", f"{S.P_PE}_max", f"{S.P_PE}_mean")


class DriftInputError(ValueError):
    """The records or the reference cannot be used; the message says why."""


def reference_acquisition(uri: str) -> pd.DataFrame:
    """One row per study of a ``slices`` dataset: its acquisition fields (the first slice's)."""
    loc = location(uri)
    if not loc.exists(loc.root):
        raise DriftInputError(f"{uri}: no such reference dataset")
    dataset = pads.dataset(loc.root, filesystem=loc.fs, format="parquet", partitioning="hive")
    missing = [c for c in (S.STUDY_UID, *ACQUISITION) if c not in dataset.schema.names]
    if missing:
        raise DriftInputError(f"{uri}: the reference has no {missing} columns: give the champion's slices dataset "
                              "(a windows dataset does not keep the acquisition fields)")
    frame = dataset.to_table(columns=[S.STUDY_UID, *ACQUISITION]).to_pandas()
    if frame.empty:
        raise DriftInputError(f"{uri}: the reference dataset holds no slices")
    return frame.groupby(S.STUDY_UID, sort=False).first().reset_index(drop=True)


def _feature(current: pd.Series, reference: pd.Series, numeric: bool, config: MonitorConfig) -> dict[str, Any]:
    out = _compare([None if pd.isna(v) else v for v in current], [None if pd.isna(v) else v for v in reference], numeric)
    psi_over = out.get("psi") is not None and out["psi"] > config.psi_threshold
    ks = out.get("ks")
    out["flagged"] = bool(psi_over and (ks is None or ks > config.ks_threshold))
    return out


def _output(site: pd.DataFrame, history: pd.DataFrame, config: MonitorConfig) -> dict[str, Any]:
    own = history[history["site"] == site["site"].iloc[0]]
    ref = own if len(own) else history
    if ref.empty:
        return {"assessed": False, "reason": "no records before the period for this model version"}
    rate, ref_rate = float((site["study_triage"] == "pe").mean()), float((ref["study_triage"] == "pe").mean())
    features = {c: _feature(site[c], ref[c], True, config) for c in SCORES}
    features["flag_rate"] = {"value": round(rate, 4), "reference": round(ref_rate, 4),
                             "flagged": abs(rate - ref_rate) > config.flag_rate_delta}
    return {"assessed": True, "reference": "site" if len(own) else "all sites", "reference_studies": len(ref),
            "features": features}


def drift_report(records: pd.DataFrame, history: pd.DataFrame, reference: pd.DataFrame, config: MonitorConfig, *,
                 since: date, until: date | None) -> dict[str, Any]:
    """Per site label: input drift against ``reference`` and output drift against ``history``."""
    if records.empty:
        raise DriftInputError(f"no monitoring records from {since} to {until or 'today'}")
    history = history[history["model_version"].isin(records["model_version"].unique())]
    sites: dict[str, Any] = {}
    for site, rows in records.groupby("site", sort=True):
        inputs = {f: _feature(rows[f], reference[f], f in NUMERIC, config) for f in ACQUISITION}
        output = _output(rows, history, config)
        flagged = sorted([f for f, v in inputs.items() if v["flagged"]]
                         + [f for f, v in output.get("features", {}).items() if v["flagged"]])
        sites[str(site)] = {"studies": len(rows), "flag_rate": round(float((rows["study_triage"] == "pe").mean()), 4),
                            "input": inputs, "output": output, "flagged": flagged}
    return {"since": since.isoformat(), "until": until.isoformat() if until else None, "studies": len(records),
            "reference_studies": len(reference), "model_versions": sorted(map(str, records["model_version"].unique())),
            "thresholds": {"psi": config.psi_threshold, "ks": config.ks_threshold, "flag_rate_delta": config.flag_rate_delta},
            "sites": sites, "drift": any(s["flagged"] for s in sites.values())}


def drift_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Flat numbers for MLflow: per site and feature its PSI and KS, and the flag rate."""
    out: dict[str, float] = {"drift": float(report["drift"]), "studies": float(report["studies"])}
    for site, s in report["sites"].items():
        out[f"{site}.flag_rate"] = s["flag_rate"]
        for kind in ("input", "output"):
            features = s[kind] if kind == "input" else s[kind].get("features", {})
            for name, v in features.items():
                out |= {f"{site}.{kind}.{name}.{k}": float(v[k]) for k in ("psi", "ks") if v.get(k) is not None}
    return out


def score_histograms(records: pd.DataFrame, history: pd.DataFrame) -> dict[str, np.ndarray]:
    """The per-study max P(PE) of each site and of the reference: what the report's plot draws."""
    out = {f"{site}": rows[f"{S.P_PE}_max"].dropna().to_numpy(float) for site, rows in records.groupby("site")}
    if len(history):
        out["reference (before the period)"] = history[f"{S.P_PE}_max"].dropna().to_numpy(float)
    return out
