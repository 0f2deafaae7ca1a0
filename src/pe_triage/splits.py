"""Patient-level train/val/test splits, stratified by (site, patient class).

Slices of one patient are strongly correlated, so a split is always by patient: a patient's slices
never appear in two splits of a fold. Stratifying by site keeps every hospital's scanners in every
split; stratifying by class keeps the rare PE patients in every split.

Allocation: within a stratum, patients are sorted by id and shuffled with a generator seeded from
the configured seed and the stratum's name (never Python's salted ``hash()``), so a run is
reproducible and adding a site does not reshuffle the others. Counts come from largest-remainder
rounding of the stratum's quota, where the rounding error is carried from one site to the next
within a class: each stratum gets within one patient of its quota, and small strata (1-3 patients,
common per site for PE) do not all round the same way, so every split still receives patients of
every class.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pe_triage import schema as S
from pe_triage.config import SplitConfig
from pe_triage.storage import atomic_path

log = logging.getLogger(__name__)

CLASSES = tuple(label.value for label in S.Label)
DISEASE = (S.Label.PE.value, S.Label.OTHER.value)


class SplitError(ValueError):
    """The data or the configuration cannot give usable splits; the message names the problem."""


def parse_ratios(text: str) -> tuple[float, float, float]:
    """``"5:3:2"`` -> ``(5.0, 3.0, 2.0)``: the train:val:test ratios as the CLI takes them."""
    parts = text.split(":")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise SplitError(f"ratios {text!r}: expected three numbers as train:val:test, e.g. 5:3:2") from None
    return check_ratios(values)


def check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """The ratios as a 3-tuple, or :class:`SplitError` unless they are three positive finite numbers."""
    values = tuple(ratios)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                                   for v in values):
        raise SplitError(f"ratios {values!r}: expected three positive numbers as train:val:test, e.g. 5:3:2")
    return values[0], values[1], values[2]


def classify_patients(slices: pa.Table) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Slice rows (site, patient_id, label) -> (patients with their class, excluded patients).

    The class is ``schema.patient_class`` of the patient's slice labels; its indeterminate slices stay
    with it (the loader leaves them out of training). A patient with any unlabelled slice is
    excluded: its class is unknown (the unlabelled slice may be the PE), so it belongs to no split.
    Exclusions are returned, never dropped silently.
    """
    for name in (S.SITE, S.PATIENT_ID, S.LABEL):
        if name not in slices.column_names:
            raise SplitError(f"slice table has no {name!r} column")
    label = slices[S.LABEL].cast(pa.string())
    known = pc.is_in(label, value_set=pa.array(CLASSES))
    unknown = pc.and_(pc.invert(known), pc.is_valid(label))
    if pc.any(unknown).as_py():
        bad = sorted(set(pc.filter(label, unknown).to_pylist()))
        raise SplitError(f"unknown label value(s) {bad}; expected one of {list(CLASSES)} or null")
    flags = pa.table(
        {
            S.SITE: slices[S.SITE].cast(pa.string()),
            S.PATIENT_ID: slices[S.PATIENT_ID].cast(pa.string()),
            **{cls: pc.equal(label, cls) for cls in S.PATIENT_CLASS_ORDER},
            "unlabelled": pc.cast(pc.is_null(label), pa.int64()),
        }
    )
    agg = flags.group_by([S.SITE, S.PATIENT_ID]).aggregate(
        [*((cls, "any") for cls in S.PATIENT_CLASS_ORDER), ("unlabelled", "sum"), ("unlabelled", "count")]
    )
    kept: dict[str, list[str]] = {S.SITE: [], S.PATIENT_ID: [], S.PATIENT_CLASS: []}
    excluded = []
    for row in agg.sort_by([(S.SITE, "ascending"), (S.PATIENT_ID, "ascending")]).to_pylist():
        if row["unlabelled_sum"]:
            excluded.append(
                {
                    S.SITE: row[S.SITE],
                    S.PATIENT_ID: row[S.PATIENT_ID],
                    "slices": row["unlabelled_count"],
                    "unlabelled_slices": row["unlabelled_sum"],
                }
            )
            continue
        cls = S.patient_class(c for c in S.PATIENT_CLASS_ORDER if row[f"{c}_any"])
        kept[S.SITE].append(row[S.SITE])
        kept[S.PATIENT_ID].append(row[S.PATIENT_ID])
        kept[S.PATIENT_CLASS].append(cls)
    return pa.table(kept), excluded


# ------------------------------------------------------------------------------------ allocation
def _stratum_rng(seed: int, site: str, cls: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{site}/{cls}".encode()).digest()
    return np.random.default_rng([seed, *(int.from_bytes(digest[i : i + 8], "little") for i in range(0, 32, 8))])


def _apportion(n: int, shares: Sequence[Fraction], carry: list[Fraction]) -> list[int]:
    """Largest-remainder counts for ``n`` patients; ``carry`` (rounding owed so far) is updated."""
    quotas = [n * s for s in shares]
    counts = [math.floor(q) for q in quotas]
    priority = [q - c + d for q, c, d in zip(quotas, counts, carry, strict=True)]
    for j in sorted(range(len(shares)), key=lambda j: (-priority[j], j))[: n - sum(counts)]:
        counts[j] += 1
    for j, (q, c) in enumerate(zip(quotas, counts, strict=True)):
        carry[j] += q - c
    return counts


def _allocate(patients: list[tuple[str, str, str]], ratios: Sequence[float], names: Sequence[str],
              seed: int) -> dict[tuple[str, str], str]:
    """(site, patient_id, class) -> split name, stratified by (site, class)."""
    total = sum(Fraction(r) for r in ratios)
    shares = [Fraction(r) / total for r in ratios]
    strata: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for site, pid, cls in patients:
        strata[cls][site].append(pid)
    out: dict[tuple[str, str], str] = {}
    for cls in sorted(strata):
        carry = [Fraction(0)] * len(shares)
        for site in sorted(strata[cls]):
            ids = sorted(strata[cls][site])
            ids = [ids[i] for i in _stratum_rng(seed, site, cls).permutation(len(ids))]
            start = 0
            for name, count in zip(names, _apportion(len(ids), shares, carry), strict=True):
                out.update({(site, pid): name for pid in ids[start : start + count]})
                start += count
    return out


def _patient_rows(patients: pa.Table) -> list[tuple[str, str, str]]:
    for name in (S.SITE, S.PATIENT_ID, S.PATIENT_CLASS):
        if name not in patients.column_names:
            raise SplitError(f"patient table has no {name!r} column")
    rows = list(zip(*(patients[c].to_pylist() for c in (S.SITE, S.PATIENT_ID, S.PATIENT_CLASS)), strict=True))
    if not rows:
        raise SplitError("no labelled patients to split")
    bad = sorted({str(cls) for _, _, cls in rows if cls not in CLASSES})
    if bad:
        raise SplitError(f"unknown patient class(es) {bad}; expected {list(CLASSES)}")
    dup = [key for key, n in Counter((s, p) for s, p, _ in rows).items() if n > 1]
    if dup:
        raise SplitError(f"{len(dup)} patient(s) listed twice, e.g. site {dup[0][0]!r} patient {dup[0][1]!r}")
    return rows


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SplitError(f"seed {seed!r}: expected a non-negative integer")
    return seed


def _table(fold_rows: list[tuple[str, tuple[str, str, str], str]]) -> pa.Table:
    fold_rows = sorted(fold_rows, key=lambda r: (r[0], r[1][0], r[1][1]))
    return pa.table(
        {
            S.FOLD: [f for f, _, _ in fold_rows],
            S.SITE: [p[0] for _, p, _ in fold_rows],
            S.PATIENT_ID: [p[1] for _, p, _ in fold_rows],
            S.PATIENT_CLASS: [p[2] for _, p, _ in fold_rows],
            S.SPLIT: [s for _, _, s in fold_rows],
        },
        schema=S.SPLITS_SCHEMA,
    )


def make_splits(patients: pa.Table, config: SplitConfig) -> pa.Table:
    """One fold (``schema.DEFAULT_FOLD``): patients allocated to train/val/test by ``config.ratios``.

    ``patients`` has one row per patient (site, patient_id, patient_class), as from
    :func:`classify_patients`. Raises :class:`SplitError` when a split gets no patient or lacks WNL
    or disease patients (stage 1 needs both everywhere).
    """
    ratios = check_ratios(config.ratios)
    rows = _patient_rows(patients)
    assigned = _allocate(rows, ratios, S.SPLITS, _check_seed(config.seed))
    table = _table([(S.DEFAULT_FOLD, p, assigned[p[0], p[1]]) for p in rows])
    check_splits(table)
    return table


def leave_one_site_out(patients: pa.Table, config: SplitConfig) -> pa.Table:
    """One fold per site, named after it: that site's patients are ``test``; the other sites' patients
    are split into train/val by the train:val part of ``config.ratios``, stratified as in
    :func:`make_splits`."""
    ratios = check_ratios(config.ratios)
    rows = _patient_rows(patients)
    seed = _check_seed(config.seed)
    sites = sorted({site for site, _, _ in rows})
    if len(sites) < 2:
        raise SplitError(f"leave-one-site-out needs at least 2 sites, got {len(sites)}: {sites}")
    fold_rows = []
    for held_out in sites:
        rest = [p for p in rows if p[0] != held_out]
        assigned = _allocate(rest, ratios[:2], S.SPLITS[:2], seed)
        fold_rows += [(held_out, p, assigned[p[0], p[1]]) for p in rest]
        fold_rows += [(held_out, p, S.SPLITS[2]) for p in rows if p[0] == held_out]
    table = _table(fold_rows)
    check_splits(table)
    return table


# ------------------------------------------------------------------------------------ checks, report
def check_splits(splits: pa.Table) -> list[str]:
    """Raise :class:`SplitError` for unusable splits; return warnings for weak ones.

    Error: a split of a fold with no patient, or without WNL or without disease patients (stage 1
    cannot be trained or evaluated there). Warning: a split without PE or without other-disease
    patients (stage 2 then sees one class there, unless PE patients also carry other-disease slices).
    """
    counts = _counts(splits)
    errors, warnings = [], []
    for fold, by_split in counts.items():
        for split in S.SPLITS:
            classes = by_split.get(split, {}).get("classes", {})
            where = f"fold {fold!r}, split {split!r}"
            if not sum(classes.values()):
                errors.append(f"{where}: no patients")
                continue
            if not classes.get(S.Label.WNL.value):
                errors.append(f"{where}: no WNL patients (stage 1 needs WNL and disease patients in every split)")
            missing = [c for c in DISEASE if not classes.get(c)]
            if len(missing) == len(DISEASE):
                errors.append(f"{where}: no disease (pe/other) patients (stage 1 needs WNL and disease patients in every split)")
            elif missing:
                warnings.append(f"{where}: no {missing[0]!r} patients (stage 2 sees only one disease class there)")
    if errors:
        raise SplitError("unusable splits: " + "; ".join(errors))
    return warnings


def _counts(splits: pa.Table) -> dict[str, dict[str, dict[str, Any]]]:
    """fold -> split -> {patients, classes: {class: n}, sites: {site: n}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    columns = (S.FOLD, S.SPLIT, S.SITE, S.PATIENT_CLASS)
    for fold, split, site, cls in zip(*(splits[c].to_pylist() for c in columns), strict=True):
        entry = out.setdefault(fold, {}).setdefault(split, {"patients": 0, "classes": dict.fromkeys(CLASSES, 0), "sites": {}})
        entry["patients"] += 1
        entry["classes"][cls] = entry["classes"].get(cls, 0) + 1
        entry["sites"][site] = entry["sites"].get(site, 0) + 1
    return out


def split_dataset(windows: str, out: str, *, config: SplitConfig, by_site: bool = False) -> dict[str, Any]:
    """Split the patients of the windows dataset at ``windows``; write the splits table to ``out``.

    Reads only (site, patient_id, label). ``by_site`` gives leave-one-site-out folds instead of the
    single ratio fold. Returns the report: patients per fold/split/class/site, excluded patients
    (pseudonymised ids) and warnings.
    """
    if not Path(windows).exists():
        raise SplitError(f"windows dataset {windows!r}: no such folder")
    slices = pads.dataset(windows, format="parquet", partitioning="hive").to_table(columns=[S.SITE, S.PATIENT_ID, S.LABEL])
    if not slices.num_rows:
        raise SplitError(f"windows dataset {windows!r} has no slices")
    if not pc.any(pc.is_valid(slices[S.LABEL])).as_py():
        raise SplitError(f"windows dataset {windows!r} has no labels at all ({slices.num_rows} unlabelled slices)")
    patients, excluded = classify_patients(slices)
    warnings = []
    if excluded:
        warnings.append(f"{len(excluded)} patient(s) with unlabelled slices excluded from every split")
    if not patients.num_rows:
        raise SplitError(f"windows dataset {windows!r}: every patient has unlabelled slices ({len(excluded)} excluded)")
    table = leave_one_site_out(patients, config) if by_site else make_splits(patients, config)
    warnings += check_splits(table)
    for message in warnings:
        log.warning("split: %s", message)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return {
        "windows": windows,
        "out": out,
        "mode": "leave_one_site_out" if by_site else "ratio",
        "ratios": list(check_ratios(config.ratios)),
        "seed": config.seed,
        "slices": slices.num_rows,
        "patients": patients.num_rows,
        "folds": _counts(table),
        "excluded": excluded,
        "warnings": warnings,
    }
