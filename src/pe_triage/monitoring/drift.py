"""``pe-triage monitor``: input and output drift of the monitoring records of a period.

Input drift: each site label's acquisition fields (one value per study) against the champion's
training data (the ``slices`` dataset it was trained on, one value per study: that site's own studies
when the label is one of its sites, so a hospital is compared with its own scanners, else all sites'),
with the onboarding report's statistics (:mod:`pe_triage.quality`: PSI on categories or reference
deciles, KS on numbers), and the HU inside the lung crop (:mod:`pe_triage.hu_summary`): the per-study
soft-tissue median HU as a number, and the PSI of the site's pooled 100-HU bin masses (``hu_psi_threshold``).
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
from pe_triage.config import CropConfig, MonitorConfig
from pe_triage.hu_summary import BINS, median_hu, summarise
from pe_triage.monitoring.store import ACQUISITION, HU_FRACTIONS, HU_MEDIAN
from pe_triage.quality import _compare, psi
from pe_triage.storage import Location, location

#: acquisition fields compared as numbers (the others as categories)
NUMERIC = {S.KVP, S.PIXEL_SPACING_ROW, S.SLICE_THICKNESS}
#: per-study score summaries compared for output drift
SCORES = (f"{S.P_DISEASE}_max", f"{S.P_PE}_max", f"{S.P_PE}_mean")


class DriftInputError(ValueError):
    """The records or the reference cannot be used; the message says why."""


def reference_acquisition(uri: str, config: MonitorConfig = MonitorConfig(), crop: CropConfig = CropConfig()) -> pd.DataFrame:
    """One row per study of a ``slices`` dataset: its acquisition fields (the first slice's) and, for
    up to ``config.hu_reference_studies`` of them, the HU summary (``hu_summary``) of its first series."""
    loc = location(uri)
    if not loc.exists(loc.root):
        raise DriftInputError(f"{uri}: no such reference dataset")
    dataset = pads.dataset(loc.root, filesystem=loc.fs, format="parquet", partitioning="hive")
    missing = [c for c in (S.STUDY_UID, *ACQUISITION) if c not in dataset.schema.names]
    if missing:
        raise DriftInputError(f"{uri}: the reference has no {missing} columns: give the champion's slices dataset "
                              "(a windows dataset does not keep the acquisition fields)")
    located = [c for c in (S.SITE, S.SERIES_UID) if c in dataset.schema.names]
    frame = dataset.to_table(columns=[S.STUDY_UID, *ACQUISITION, *located]).to_pandas()
    if frame.empty:
        raise DriftInputError(f"{uri}: the reference dataset holds no slices")
    studies = frame.groupby(S.STUDY_UID, sort=False).first().reset_index(drop=True)
    if S.HU in dataset.schema.names and len(located) == 2:
        studies = _reference_hu(loc, studies, config.hu_reference_studies, crop)
    return studies.drop(columns=[S.SERIES_UID], errors="ignore")


def _reference_hu(loc: Location, studies: pd.DataFrame, n: int, crop: CropConfig) -> pd.DataFrame:
    """``studies`` with the HU summary of ``n`` of them (spread evenly over the list: a sample is enough
    for bin masses and a decile PSI, and keeps the reference to seconds on a large store)."""
    picks = np.unique(np.linspace(0, len(studies) - 1, min(n, len(studies))).round().astype(int))
    medians: list[float | None] = [None] * len(studies)
    fractions: list[list[float] | None] = [None] * len(studies)
    for i in picks:
        row = studies.iloc[i]
        hu = summarise(loc, [loc.join(f"{S.SITE}={row[S.SITE]}", f"{row[S.SERIES_UID]}.parquet")], crop)
        medians[i], fractions[i] = hu.median(), hu.fractions()
    return studies.assign(**{HU_MEDIAN: medians, HU_FRACTIONS: fractions})


def _hu_histogram(current: pd.Series, reference: pd.Series, config: MonitorConfig) -> dict[str, Any] | None:
    """PSI between the pooled bin masses of the site's studies and of the reference (None: either lacks them)."""
    cur = [np.asarray(v, float) for v in current if isinstance(v, (list, np.ndarray)) and len(v) == BINS]
    ref = [np.asarray(v, float) for v in reference if isinstance(v, (list, np.ndarray)) and len(v) == BINS]
    if not cur or not ref:
        return None
    mass, ref_mass = np.mean(cur, axis=0), np.mean(ref, axis=0)
    value = round(psi(ref_mass, mass), 4)
    return {"psi": value, "value": median_hu(mass), "reference": median_hu(ref_mass), "studies": len(cur),
            "reference_studies": len(ref), "flagged": value > config.hu_psi_threshold}


def _hu_inputs(rows: pd.DataFrame, reference: pd.DataFrame, config: MonitorConfig) -> dict[str, Any]:
    """The HU features of a site's input drift: per-study soft-tissue median HU (PSI + KS, as a number, and a
    gap of the medians above ``hu_median_delta``) and the bin masses."""
    if HU_MEDIAN not in reference.columns or HU_MEDIAN not in rows.columns:
        return {}
    out = {HU_MEDIAN: _feature(rows[HU_MEDIAN], reference[HU_MEDIAN], True, config)}
    value, ref = rows[HU_MEDIAN].dropna(), reference[HU_MEDIAN].dropna()
    if len(value) and len(ref):  # PSI and KS see any systematic gap; flag only one that matters
        out[HU_MEDIAN] |= {"value": round(float(value.median()), 1), "reference": round(float(ref.median()), 1)}
        out[HU_MEDIAN]["flagged"] &= abs(out[HU_MEDIAN]["value"] - out[HU_MEDIAN]["reference"]) > config.hu_median_delta
    if (hist := _hu_histogram(rows[HU_FRACTIONS], reference[HU_FRACTIONS], config)) is not None:
        out[HU_FRACTIONS] = hist
    return out


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
        own = reference[reference[S.SITE] == site] if S.SITE in reference.columns else reference.iloc[0:0]
        ref = own if len(own) else reference  # a site the champion was trained on is compared with its own studies
        inputs = {f: _feature(rows[f], ref[f], f in NUMERIC, config) for f in ACQUISITION}
        inputs |= _hu_inputs(rows, ref, config)
        output = _output(rows, history, config)
        flagged = sorted([f for f, v in inputs.items() if v["flagged"]]
                         + [f for f, v in output.get("features", {}).items() if v["flagged"]])
        sites[str(site)] = {"studies": len(rows), "flag_rate": round(float((rows["study_triage"] == "pe").mean()), 4),
                            "input_reference": "site" if len(own) else "all sites", "input": inputs, "output": output,
                            "flagged": flagged}
    return {"since": since.isoformat(), "until": until.isoformat() if until else None, "studies": len(records),
            "reference_studies": len(reference), "model_versions": sorted(map(str, records["model_version"].unique())),
            "thresholds": {"psi": config.psi_threshold, "ks": config.ks_threshold, "flag_rate_delta": config.flag_rate_delta,
                           "hu_psi": config.hu_psi_threshold},
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
