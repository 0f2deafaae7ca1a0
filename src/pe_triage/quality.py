"""Data-quality report of one onboarded site: what arrived, what was refused, what the images look
like, and how the site differs from the sites already in the ``slices`` dataset.

Onboarding a hospital is where scanner fleets, reconstruction habits and labelling practice enter
the training data. The report makes them visible before a retraining run mixes them in: counts and
quarantine reasons (from ingest), HU, pixel spacing, slice thickness, vendor, kernel and kVp
distributions, class balance, and drift against the other sites (population stability index on
each distribution, two-sample Kolmogorov-Smirnov on the continuous ones; PSI above 0.25 — the
usual "significant shift" level — is flagged).

Reads the dataset at a folder or ``s3://`` URI; the pixel column only for a sample of slices.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from scipy.stats import ks_2samp

from pe_triage import __version__
from pe_triage import schema as S
from pe_triage.provenance import parquet_dataset_digest
from pe_triage.splits import classify_patients
from pe_triage.storage import Location, location

#: PSI above this flags a feature as drifted (0.1-0.25: moderate shift, above 0.25: significant)
PSI_THRESHOLD = 0.25
#: slices per site whose pixels are read for the HU distribution (evenly spread over its series)
HU_SAMPLE_SLICES = 64
#: every n-th pixel along each axis of a sampled slice (a 512 image gives 16k pixels at 4)
HU_PIXEL_STRIDE = 4
#: HU histogram bins: 100 HU wide over the reconstructed range, open at both ends
HU_EDGES = np.array([-np.inf, *range(-1000, 3001, 100), np.inf])
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
#: class-balance columns: slice labels, and patient classes (schema.patient_class)
_CLASSES = tuple(label.value for label in S.Label)
#: a numeric feature with at most this many distinct values is compared as categories
_FEW_VALUES = 20
_EPS = 1e-4
_META_COLUMNS = [S.SITE, S.PATIENT_ID, S.STUDY_UID, S.SERIES_UID, S.SLICE_INDEX, S.ROWS, S.COLS, S.PIXEL_SPACING_ROW,
                 S.PIXEL_SPACING_COL, S.SLICE_THICKNESS, S.MANUFACTURER, S.MODEL, S.KERNEL, S.KVP, S.CONTRAST,
                 S.TRANSFER_SYNTAX, S.UIDS_DERIVED, S.LABEL]
#: per-slice features compared across sites: column -> numeric (True) or categorical
_FEATURES = {S.PIXEL_SPACING_ROW: True, S.SLICE_THICKNESS: True, S.KVP: True, S.MANUFACTURER: False, S.KERNEL: False,
             "matrix": False}


class QualityError(ValueError):
    """The site is not in the dataset; the message names both."""


# ------------------------------------------------------------------------------ dataset version
def dataset_version(uri: str, site: str | None = None) -> dict[str, Any]:
    """Digest, file and row counts of a Parquet dataset (or of one site's partition of it), from
    Parquet footers only: cheap enough to run before every retraining. The digest is
    :func:`pe_triage.provenance.dataset_digest`'s."""
    try:
        digest, files, rows = parquet_dataset_digest(uri, f"{S.SITE}={site}" if site else None)
    except ValueError as e:
        raise QualityError(str(e)) from None
    return {"uri": uri, "site": site, "digest": digest, "files": files, "rows": rows}


# ------------------------------------------------------------------------------ statistics
def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two histograms over the same bins (counts or fractions)."""
    p = np.asarray(expected, float)
    q = np.asarray(actual, float)
    p = np.clip(p / p.sum(), _EPS, None)
    q = np.clip(q / q.sum(), _EPS, None)
    return float(np.sum((q - p) * np.log(q / p)))


def _summary(values: np.ndarray) -> dict[str, Any]:
    values = values[np.isfinite(values)]
    if not values.size:
        return {"n": 0}
    out: dict[str, Any] = {"n": int(values.size), "mean": round(float(values.mean()), 3), "min": float(values.min()),
                           **{f"p{q}": float(np.percentile(values, q)) for q in (5, 50, 95)}, "max": float(values.max())}
    distinct, counts = np.unique(values.round(3), return_counts=True)
    if distinct.size <= _FEW_VALUES:
        out["values"] = {f"{v:g}": int(c) for v, c in zip(distinct, counts, strict=True)}
    return out


def _counts(values: list[Any]) -> dict[str, int]:
    return dict(sorted(Counter("missing" if v is None else str(v) for v in values).items()))


def _feature(table: pa.Table, name: str) -> list[Any]:
    if name == "matrix":
        return [f"{r}x{c}" for r, c in zip(table[S.ROWS].to_pylist(), table[S.COLS].to_pylist(), strict=True)]
    return table[name].to_pylist()


def _compare(site_values: list[Any], ref_values: list[Any], numeric: bool) -> dict[str, Any]:
    """PSI (on categories, or on reference deciles for a continuous feature) and, for numbers, KS."""
    out: dict[str, Any] = {}
    if numeric:
        a = np.array([v for v in site_values if v is not None], float)
        b = np.array([v for v in ref_values if v is not None], float)
        if not a.size or not b.size:
            return {"psi": None, "ks": None, "flagged": False}
        out["ks"] = round(float(ks_2samp(a, b).statistic), 4)
        if np.unique(np.concatenate([a, b]).round(3)).size > _FEW_VALUES:
            edges = np.unique(np.quantile(b, np.linspace(0, 1, 11)))
            edges = np.array([-np.inf, *edges[1:-1], np.inf])
            out["psi"] = round(psi(np.histogram(b, edges)[0], np.histogram(a, edges)[0]), 4)
            out["flagged"] = out["psi"] > PSI_THRESHOLD
            return out
        site_values, ref_values = [round(v, 3) for v in a], [round(v, 3) for v in b]
    cats = sorted({str(v) for v in (*site_values, *ref_values)})
    ref, cur = Counter(str(v) for v in ref_values), Counter(str(v) for v in site_values)
    out["psi"] = round(psi(np.array([ref[c] for c in cats]), np.array([cur[c] for c in cats])), 4)
    out["flagged"] = out["psi"] > PSI_THRESHOLD
    return out


# ------------------------------------------------------------------------------ reading
def _meta(loc: Location) -> pa.Table:
    dataset = pads.dataset(loc.root, filesystem=loc.fs, format="parquet", partitioning="hive")
    return dataset.to_table(columns=_META_COLUMNS)


def hu_sample(loc: Location, site: str, table: pa.Table, *, slices: int = HU_SAMPLE_SLICES,
              stride: int = HU_PIXEL_STRIDE) -> tuple[np.ndarray, int]:
    """HU values (every ``stride``-th pixel) of up to ``slices`` slices of ``site`` spread evenly over
    its series in z order, reading only the row groups that hold them; (values, slices read)."""
    rows = table.filter(pc.equal(table[S.SITE], site)).select([S.SERIES_UID, S.SLICE_INDEX])
    rows = rows.sort_by([(S.SERIES_UID, "ascending"), (S.SLICE_INDEX, "ascending")])
    if not rows.num_rows:
        return np.empty(0, np.int16), 0
    picks = np.unique(np.linspace(0, rows.num_rows - 1, min(slices, rows.num_rows)).round().astype(int))
    wanted: dict[str, set[int]] = {}
    picked = (pc.take(rows[S.SERIES_UID], picks).to_pylist(), pc.take(rows[S.SLICE_INDEX], picks).to_pylist())
    for series, index in zip(*picked, strict=True):
        wanted.setdefault(series, set()).add(index)
    parts = []
    for series, indices in sorted(wanted.items()):
        with loc.fs.open_input_file(loc.join(f"{S.SITE}={site}", f"{series}.parquet")) as f:
            parquet = pq.ParquetFile(f)
            positions = parquet.read(columns=[S.SLICE_INDEX])[S.SLICE_INDEX].to_numpy()
            bounds = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
            groups = sorted({int(np.searchsorted(bounds, p, side="right") - 1)
                             for p in np.flatnonzero(np.isin(positions, list(indices)))})
            part = parquet.read_row_groups(groups, columns=[S.SLICE_INDEX, S.ROWS, S.COLS, S.HU])
        for row in part.to_pylist():
            if row[S.SLICE_INDEX] in indices:
                parts.append(S.decode_hu(row[S.HU], row[S.ROWS], row[S.COLS])[::stride, ::stride].ravel())
    return np.concatenate(parts), len(parts)


def _hu_summary(values: np.ndarray, n_slices: int) -> dict[str, Any]:
    if not values.size:
        return {"sampled_slices": 0}
    return {
        "sampled_slices": n_slices,
        "sampled_pixels": int(values.size),
        "mean": round(float(values.mean()), 1),
        "std": round(float(values.std()), 1),
        "percentiles": {f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True)},
        "histogram": {"edges": [float(e) for e in HU_EDGES], "counts": np.histogram(values, HU_EDGES)[0].tolist()},
    }


def _read_json(loc: Location, path: str) -> dict[str, Any] | None:
    return json.loads(loc.read(path)) if loc.exists(path) else None


# ------------------------------------------------------------------------------ the report
def site_report(uri: str, site: str, *, hu_slices: int = HU_SAMPLE_SLICES) -> dict[str, Any]:
    """The data-quality report of ``site`` in the slices dataset at ``uri`` (JSON-able; no PHI:
    identifiers in the dataset are pseudonyms and the report carries only counts)."""
    loc = location(uri)
    table = _meta(loc)
    mine = table.filter(pc.equal(table[S.SITE], site))
    if not mine.num_rows:
        raise QualityError(f"site {site!r} has no slices in {uri} (sites: {sorted(set(table[S.SITE].to_pylist()))})")
    others = table.filter(pc.not_equal(table[S.SITE], site))
    ingest = _read_json(loc, loc.join("_reports", f"{S.SITE}={site}", "ingest_report.json")) or {}
    qpath = loc.join("_quarantine", f"{S.SITE}={site}", "quarantine.parquet")
    quarantine = pq.read_table(qpath, filesystem=loc.fs, columns=[S.REASON]) if loc.exists(qpath) else None

    patients, excluded = classify_patients(mine.select([S.SITE, S.PATIENT_ID, S.LABEL]))
    labels = Counter(v or "unlabelled" for v in mine[S.LABEL].to_pylist())
    hu_values, hu_n = hu_sample(loc, site, mine, slices=hu_slices)
    drift = _drift(loc, mine, others, hu_values, hu_slices=hu_slices)

    report = {
        "site": site,
        "dataset": uri,
        "version": dataset_version(uri, site),
        "dataset_digest": dataset_version(uri)["digest"],
        "pe_triage_version": __version__,
        "counts": {
            "patients": len(set(mine[S.PATIENT_ID].to_pylist())),
            "studies": len(set(mine[S.STUDY_UID].to_pylist())),
            "series": len(set(mine[S.SERIES_UID].to_pylist())),
            "slices": mine.num_rows,
            "slices_with_derived_uids": int(pc.sum(mine[S.UIDS_DERIVED]).as_py() or 0),
            "files_latest_ingest": ingest.get("files"),
        },
        "quarantine": _counts(quarantine[S.REASON].to_pylist()) if quarantine is not None else {},
        "class_balance": {
            "slices": {k: labels.get(k, 0) for k in (*_CLASSES, "unlabelled")},
            "patients": {k: patients[S.PATIENT_CLASS].to_pylist().count(k) for k in _CLASSES},
            "patients_excluded_unlabelled": len(excluded),
        },
        "acquisition": _acquisition(mine),
        "hu": _hu_summary(hu_values, hu_n),
        "drift": drift,
    }
    report["warnings"] = _warnings(report)
    return report


def _acquisition(mine: pa.Table) -> dict[str, Any]:
    """How the site's slices were acquired and reconstructed: distributions of the scanner settings."""
    return {
        "pixel_spacing_mm": _summary(mine[S.PIXEL_SPACING_ROW].to_numpy(zero_copy_only=False).astype(float)),
        "slice_thickness_mm": _summary(_floats(mine[S.SLICE_THICKNESS].to_pylist())),
        "kvp": _summary(_floats(mine[S.KVP].to_pylist())),
        "manufacturer": _counts(mine[S.MANUFACTURER].to_pylist()),
        "model": _counts(mine[S.MODEL].to_pylist()),
        "kernel": _counts(mine[S.KERNEL].to_pylist()),
        "matrix": _counts(_feature(mine, "matrix")),
        "contrast": _counts(mine[S.CONTRAST].to_pylist()),
        "transfer_syntax": _counts(mine[S.TRANSFER_SYNTAX].to_pylist()),
    }


def _floats(values: list[float | None]) -> np.ndarray:
    """Missing values as NaN, which :func:`_summary` leaves out."""
    return np.array([v if v is not None else np.nan for v in values], float)


def _drift(loc: Location, mine: pa.Table, others: pa.Table, hu_values: np.ndarray, *, hu_slices: int) -> dict[str, Any]:
    """Each feature of the site against the pooled other sites (PSI, and KS for numbers); empty
    when the site is the first one in the dataset."""
    ref_sites = sorted(set(others[S.SITE].to_pylist()))
    drift: dict[str, Any] = {"reference_sites": ref_sites, "psi_threshold": PSI_THRESHOLD, "features": {}}
    if ref_sites:
        for name, numeric in _FEATURES.items():
            drift["features"][name] = _compare(_feature(mine, name), _feature(others, name), numeric)
        ref_hist = sum((np.histogram(hu_sample(loc, s, others, slices=hu_slices)[0], HU_EDGES)[0] for s in ref_sites),
                       np.zeros(len(HU_EDGES) - 1))
        if hu_values.size and ref_hist.sum():
            value = round(psi(ref_hist, np.histogram(hu_values, HU_EDGES)[0]), 4)
            drift["features"]["hu"] = {"psi": value, "flagged": value > PSI_THRESHOLD}
    drift["flagged"] = sorted(k for k, v in drift["features"].items() if v.get("flagged"))
    return drift


def _warnings(report: dict[str, Any]) -> list[str]:
    out = []
    balance = report["class_balance"]
    if not balance["patients"]["pe"]:
        out.append("no PE patient: the site adds nothing to stage 2's positive class")
    if not balance["patients"]["wnl"]:
        out.append("no WNL patient")
    if balance["patients_excluded_unlabelled"]:
        out.append(f"{balance['patients_excluded_unlabelled']} patient(s) with unlabelled slices are excluded from splits")
    files = report["counts"]["files_latest_ingest"] or {}
    if files.get("seen") and files.get("quarantined", 0) / files["seen"] > 0.05:
        out.append(f"{files['quarantined']} of {files['seen']} files quarantined (over 5%)")
    if report["drift"]["flagged"]:
        out.append(f"drift against {', '.join(report['drift']['reference_sites'])}: {', '.join(report['drift']['flagged'])}")
    return out


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of a report as flat ``name -> float`` (MLflow and KFP metrics)."""
    out = {k: float(v) for k, v in report["counts"].items() if isinstance(v, int)}
    out.update({f"quarantined_{k}": float(v) for k, v in report["quarantine"].items()})
    out.update({f"slices_{k}": float(v) for k, v in report["class_balance"]["slices"].items()})
    out.update({f"patients_{k}": float(v) for k, v in report["class_balance"]["patients"].items()})
    out.update({f"hu_{k}": v for k, v in report["hu"].get("percentiles", {}).items()})
    for name, stats in report["drift"]["features"].items():
        out.update({f"drift_{name}_{k}": float(stats[k]) for k in ("psi", "ks") if stats.get(k) is not None})
    out["drift_flagged"] = float(len(report["drift"]["flagged"]))
    return {k.replace(" ", "_"): v for k, v in out.items() if math.isfinite(v)}


# ------------------------------------------------------------------------------ rendering
def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]


def to_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page (the KFP UI and MLflow show it as is)."""
    c, bal, acq, hu, drift = report["counts"], report["class_balance"], report["acquisition"], report["hu"], report["drift"]
    files = c["files_latest_ingest"] or {}
    lines = [f"# Data quality: {report['site']}", "",
             f"Dataset `{report['dataset']}`, site digest `{report['version']['digest'][:16]}`, "
             f"pe-triage {report['pe_triage_version']}.", ""]
    if report["warnings"]:
        lines += ["**Warnings**", "", *(f"- {w}" for w in report["warnings"]), ""]
    lines += ["## Counts", ""] + _table(
        ["patients", "studies", "series", "slices", "files seen", "ingested", "duplicates", "quarantined"],
        [[c["patients"], c["studies"], c["series"], c["slices"], files.get("seen", "-"), files.get("ingested", "-"),
          files.get("duplicates", "-"), files.get("quarantined", "-")]])
    if report["quarantine"]:
        lines += ["## Quarantine reasons", ""] + _table(["reason", "files"], [[k, v] for k, v in report["quarantine"].items()])
    lines += ["## Class balance", ""] + _table(["", *_CLASSES, "unlabelled"], [
        ["slices", *(bal["slices"][k] for k in (*_CLASSES, "unlabelled"))],
        ["patients", *(bal["patients"][k] for k in _CLASSES), bal["patients_excluded_unlabelled"]]])
    lines += ["## Acquisition", ""] + _table(["feature", "distribution"], [
        *([k, ", ".join(f"{v} ({n})" for v, n in acq[k].get("values", {}).items()) or
           f"{acq[k].get('p5')} – {acq[k].get('p95')} (median {acq[k].get('p50')})"]
          for k in ("pixel_spacing_mm", "slice_thickness_mm", "kvp")),
        *([k, ", ".join(f"{v} ({n})" for v, n in acq[k].items())]
          for k in ("manufacturer", "model", "kernel", "matrix", "contrast", "transfer_syntax"))])
    if hu.get("percentiles"):
        lines += [f"## HU ({hu['sampled_slices']} sampled slices)", ""] + _table(
            [*hu["percentiles"], "mean", "std"], [[*(f"{v:g}" for v in hu["percentiles"].values()), hu["mean"], hu["std"]]])
    lines += ["## Drift against the other sites", ""]
    if drift["reference_sites"]:
        lines += [f"Reference: {', '.join(drift['reference_sites'])}; PSI above {drift['psi_threshold']} is flagged.", ""]
        lines += _table(["feature", "PSI", "KS", "flagged"], [
            [k, v.get("psi"), v.get("ks", "-"), "**yes**" if v.get("flagged") else "no"] for k, v in drift["features"].items()])
    else:
        lines += ["First site of the dataset: nothing to compare with.", ""]
    return "\n".join(lines)
