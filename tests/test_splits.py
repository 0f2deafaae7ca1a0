"""Patient-level splits: disjoint, complete, stratified, reproducible, and loud about bad data."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pe_triage import schema as S
from pe_triage import splits as splits_mod
from pe_triage.config import SplitConfig
from pe_triage.splits import SplitError, leave_one_site_out, make_splits, parse_ratios, split_dataset

WINDOW_DEFS = [{"name": "vascular", "lo": 0.0, "hi": 650.0}]


def cohort(sizes: dict[str, tuple[int, int, int]]) -> pa.Table:
    """Patients per site as (wnl, pe, other) counts, with pseudonym-like ids (unrelated to class)."""
    rows = [
        (site, hashlib.sha256(f"{site}/{cls}/{i}".encode()).hexdigest()[:16], cls)
        for site, counts in sizes.items()
        for cls, n in zip(("wnl", "pe", "other"), counts, strict=True)
        for i in range(n)
    ]
    return pa.table({S.SITE: [r[0] for r in rows], S.PATIENT_ID: [r[1] for r in rows], S.PATIENT_CLASS: [r[2] for r in rows]})


STUDY_LIKE = {"site-a": (12, 4, 5), "site-b": (9, 3, 2), "site-c": (6, 2, 2)}


def assignment(table: pa.Table) -> dict[tuple[str, str, str], str]:
    """(fold, site, patient) -> split; fails on a patient listed twice in a fold."""
    keys = list(zip(*(table[c].to_pylist() for c in (S.FOLD, S.SITE, S.PATIENT_ID)), strict=True))
    assert len(keys) == len(set(keys)), "a patient is in two splits of a fold"
    return dict(zip(keys, table[S.SPLIT].to_pylist(), strict=True))


def write_windows(root: Path, slices: dict[tuple[str, str], list[str | None]]) -> Path:
    """A tiny windows dataset: one series file per patient, slice labels as given."""
    schema = S.windows_schema(len(WINDOW_DEFS), 4).with_metadata({S.META_WINDOWS: json.dumps(WINDOW_DEFS)})
    for (site, pid), labels in slices.items():
        n = len(labels)
        cols = {
            S.SITE: [site] * n, S.PATIENT_ID: [pid] * n, S.STUDY_UID: ["st"] * n, S.SERIES_UID: [f"se-{pid}"] * n,
            S.SOP_UID: [f"{pid}-{i}" for i in range(n)], S.SLICE_INDEX: list(range(n)), S.Z_MM: [float(i) for i in range(n)],
            S.SOURCE_HMAC: ["0" * 64] * n, S.LABEL: labels,
            S.CROP_Y0: [0] * n, S.CROP_Y1: [4] * n, S.CROP_X0: [0] * n, S.CROP_X1: [4] * n, S.LUNG_FOUND: [True] * n,
        }
        arrays = [pa.array(cols[f.name], f.type) for f in schema if f.name != S.WINDOWS]
        arrays.append(S.windows_array(np.zeros((n, 1, 4, 4), np.uint8)))
        path = root / f"site={site}" / f"se-{pid}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path)
    return root


def slices_for(patients: pa.Table) -> dict[tuple[str, str], list[str | None]]:
    """Slice labels that give each patient its class (disease patients also have WNL slices)."""
    extra: dict[str, list[str | None]] = {"wnl": [], "pe": ["pe", "other"], "other": ["other"]}
    rows = zip(*(patients[c].to_pylist() for c in (S.SITE, S.PATIENT_ID, S.PATIENT_CLASS)), strict=True)
    return {(site, pid): ["wnl", "wnl", *extra[cls]] for site, pid, cls in rows}


# ------------------------------------------------------------------------------------ allocation
@pytest.mark.parametrize("split_fn", [make_splits, leave_one_site_out])
def test_every_patient_in_exactly_one_split_per_fold(split_fn: Callable[[pa.Table, SplitConfig], pa.Table]) -> None:
    patients = cohort(STUDY_LIKE)
    table = split_fn(patients, SplitConfig())
    assert table.schema.equals(S.SPLITS_SCHEMA)
    by_fold: dict[str, set[tuple[str, str]]] = {}
    for (fold, site, pid), split in assignment(table).items():
        assert split in S.SPLITS
        by_fold.setdefault(fold, set()).add((site, pid))
    everyone = set(zip(patients[S.SITE].to_pylist(), patients[S.PATIENT_ID].to_pylist(), strict=True))
    assert by_fold and all(members == everyone for members in by_fold.values())


@pytest.mark.parametrize("ratios", [(5, 3, 2), (1, 1, 1), (7, 2, 1), (0.6, 0.2, 0.2)])
@pytest.mark.parametrize("sizes", [STUDY_LIKE, {"x": (40, 3, 7), "y": (1, 1, 1), "z": (17, 2, 5)}])
def test_each_stratum_within_one_patient_of_its_quota(ratios: tuple[float, ...], sizes: dict[str, tuple[int, int, int]]) -> None:
    table = make_splits(cohort(sizes), SplitConfig(ratios=ratios, seed=3))
    shares = [Fraction(r) / sum(Fraction(x) for x in ratios) for r in ratios]
    got = Counter(zip(table[S.SITE].to_pylist(), table[S.PATIENT_CLASS].to_pylist(), table[S.SPLIT].to_pylist(), strict=True))
    for site, counts in sizes.items():
        for cls, n in zip(("wnl", "pe", "other"), counts, strict=True):
            for split, share in zip(S.SPLITS, shares, strict=True):
                assert abs(got[site, cls, split] - n * share) <= 1, (site, cls, split)
    per_class = Counter(zip(table[S.PATIENT_CLASS].to_pylist(), table[S.SPLIT].to_pylist(), strict=True))
    for k, cls in enumerate(("wnl", "pe", "other")):
        total = sum(counts[k] for counts in sizes.values())
        for split, share in zip(S.SPLITS, shares, strict=True):
            assert abs(per_class[cls, split] - total * share) <= 1, (cls, split)


def test_small_strata_still_reach_every_split() -> None:
    """Three sites with 2 PE patients each: per-site rounding alone would leave test without PE."""
    table = make_splits(cohort({"a": (10, 2, 2), "b": (10, 2, 2), "c": (10, 2, 2)}), SplitConfig())
    per_class = Counter(zip(table[S.PATIENT_CLASS].to_pylist(), table[S.SPLIT].to_pylist(), strict=True))
    assert [per_class["pe", s] for s in S.SPLITS] == [3, 2, 1]


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    patients = cohort(STUDY_LIKE)
    first = make_splits(patients, SplitConfig(seed=11))
    assert make_splits(patients, SplitConfig(seed=11)).equals(first)
    reversed_input = patients.take(np.arange(patients.num_rows)[::-1])
    assert make_splits(reversed_input, SplitConfig(seed=11)).equals(first), "input order matters"
    assert not make_splits(patients, SplitConfig(seed=12)).equals(first)


def test_same_splits_in_another_process_with_another_hash_seed(tmp_path: Path) -> None:
    """Python's hash() of a string changes between processes; the stratum seed must not use it."""
    table = make_splits(cohort(STUDY_LIKE), SplitConfig(seed=5))
    pq.write_table(cohort(STUDY_LIKE), tmp_path / "patients.parquet")
    code = (
        "import sys, pyarrow.parquet as pq\n"
        "from pe_triage.config import SplitConfig\nfrom pe_triage.splits import make_splits\n"
        "pq.write_table(make_splits(pq.read_table(sys.argv[1]), SplitConfig(seed=5)), sys.argv[2])\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "patients.parquet"), str(tmp_path / "s.parquet")], check=True,
                   env=env)
    assert pq.read_table(tmp_path / "s.parquet").equals(table)


def test_leave_one_site_out_holds_out_each_site_in_its_own_fold() -> None:
    patients = cohort(STUDY_LIKE)
    table = leave_one_site_out(patients, SplitConfig(ratios=(5, 3, 2)))
    got = assignment(table)
    assert set(table[S.FOLD].to_pylist()) == set(STUDY_LIKE)
    for (fold, site, _), split in got.items():
        assert (split == "test") == (site == fold)
    for fold in STUDY_LIKE:
        rest = Counter(split for (f, site, _), split in got.items() if f == fold and site != fold)
        n = sum(rest.values())
        assert abs(rest["train"] - n * 5 / 8) <= 3 and abs(rest["val"] - n * 3 / 8) <= 3  # within 1 per (site, class)


# ------------------------------------------------------------------------------------ errors
def test_a_split_without_a_class_is_an_error_naming_fold_split_and_class() -> None:
    with pytest.raises(SplitError, match=r"fold 'default', split 'test': no disease"):
        make_splits(cohort({"a": (10, 1, 0)}), SplitConfig())
    with pytest.raises(SplitError, match=r"fold 'default', split 'test': no patients"):
        make_splits(cohort({"a": (1, 1, 0)}), SplitConfig())
    with pytest.raises(SplitError, match=r"fold 'b', split 'test': no WNL patients"):
        leave_one_site_out(cohort({"a": (5, 2, 2), "b": (0, 1, 1), "c": (5, 2, 2)}), SplitConfig())


def test_leave_one_site_out_needs_two_sites() -> None:
    with pytest.raises(SplitError, match="at least 2 sites, got 1"):
        leave_one_site_out(cohort({"a": (10, 5, 5)}), SplitConfig())


@pytest.mark.parametrize("ratios", [(5, 3), (5, 0, 2), (5, -3, 2), (5, float("nan"), 2), (1, 2, 3, 4)])
def test_ratios_must_be_three_positive_numbers(ratios: tuple[float, ...]) -> None:
    with pytest.raises(SplitError, match="three positive numbers"):
        make_splits(cohort(STUDY_LIKE), SplitConfig(ratios=ratios))  # type: ignore[arg-type]


def test_parse_ratios() -> None:
    assert parse_ratios("5:3:2") == (5.0, 3.0, 2.0)
    assert parse_ratios("0.6:0.2:0.2") == (0.6, 0.2, 0.2)
    for bad in ("5:3", "a:b:c", "5:0:2", "", "5,3,2"):
        with pytest.raises(SplitError, match="three"):
            parse_ratios(bad)


# ------------------------------------------------------------------------------------ split_dataset
def test_split_dataset_writes_one_file_and_reports(tmp_path: Path) -> None:
    patients = cohort(STUDY_LIKE)
    windows = write_windows(tmp_path / "windows", slices_for(patients))
    report = split_dataset(str(windows), str(tmp_path / "out" / "splits.parquet"), config=SplitConfig())
    written = pq.read_table(tmp_path / "out" / "splits.parquet")
    assert written.schema.equals(S.SPLITS_SCHEMA) and os.listdir(tmp_path / "out") == ["splits.parquet"]
    assert written.equals(make_splits(patients, SplitConfig()))
    fold = report["folds"][S.DEFAULT_FOLD]
    assert sum(fold[s]["patients"] for s in S.SPLITS) == patients.num_rows == report["patients"]
    assert sum(fold[s]["classes"]["pe"] for s in S.SPLITS) == sum(c[1] for c in STUDY_LIKE.values())
    assert sum(fold[s]["sites"]["site-b"] for s in S.SPLITS) == sum(STUDY_LIKE["site-b"])
    assert report["excluded"] == [] and json.dumps(report)

    by_site = split_dataset(str(windows), str(tmp_path / "loso.parquet"), config=SplitConfig(), by_site=True)
    assert set(by_site["folds"]) == set(STUDY_LIKE) and by_site["mode"] == "leave_one_site_out"


def test_unlabelled_patients_are_excluded_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    patients = cohort(STUDY_LIKE)
    slices = slices_for(patients)
    partly = next(iter(slices))
    slices[partly] = ["wnl", None, "pe"]
    slices["site-a", "never-labelled"] = [None, None]
    report = split_dataset(str(write_windows(tmp_path / "w", slices)), str(tmp_path / "s.parquet"), config=SplitConfig())
    excluded = {(e[S.SITE], e[S.PATIENT_ID]): e["unlabelled_slices"] for e in report["excluded"]}
    assert excluded == {partly: 1, ("site-a", "never-labelled"): 2}
    written = set(zip(*(pq.read_table(tmp_path / "s.parquet")[c].to_pylist() for c in (S.SITE, S.PATIENT_ID)), strict=True))
    assert not written & set(excluded) and len(written) == patients.num_rows - 1
    assert any("2 patient(s) with unlabelled slices excluded" in w for w in report["warnings"])
    assert "excluded" in caplog.text


def test_indeterminate_slices_stay_with_their_patient_and_rank_below_a_definite_finding(tmp_path: Path) -> None:
    patients = cohort(STUDY_LIKE)
    slices = slices_for(patients)
    pe_patient = next(k for k, labels in slices.items() if "pe" in labels)
    slices[pe_patient] = [*slices[pe_patient], "indeterminate"]
    unsure = {("site-a", f"unsure-{i}") for i in range(3)}
    slices.update({key: ["wnl", "indeterminate", "wnl"] for key in unsure})
    report = split_dataset(str(write_windows(tmp_path / "w", slices)), str(tmp_path / "s.parquet"), config=SplitConfig())
    written = pq.read_table(tmp_path / "s.parquet")
    keys = zip(written[S.SITE].to_pylist(), written[S.PATIENT_ID].to_pylist(), strict=True)
    classes = dict(zip(keys, written[S.PATIENT_CLASS].to_pylist(), strict=True))
    assert len(classes) == written.num_rows == patients.num_rows + len(unsure) and report["excluded"] == []
    assert classes[pe_patient] == "pe" and {classes[k] for k in unsure} == {"indeterminate"}
    fold = report["folds"][S.DEFAULT_FOLD]
    assert [fold[s]["classes"]["indeterminate"] for s in S.SPLITS] == [1, 1, 1]  # stratified like any class


def test_a_dataset_without_labels_is_an_error(tmp_path: Path) -> None:
    windows = write_windows(tmp_path / "w", {("a", "p1"): [None, None], ("a", "p2"): [None]})
    with pytest.raises(SplitError, match="no labels at all"):
        split_dataset(str(windows), str(tmp_path / "s.parquet"), config=SplitConfig())
    assert not (tmp_path / "s.parquet").exists()


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    windows = write_windows(tmp_path / "w", slices_for(cohort(STUDY_LIKE)))
    out = tmp_path / "out" / "splits.parquet"
    split_dataset(str(windows), str(out), config=SplitConfig(seed=1))
    before = out.read_bytes()

    def broken(table: pa.Table, where: Path) -> None:
        Path(where).write_bytes(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(splits_mod.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        split_dataset(str(windows), str(out), config=SplitConfig(seed=2))
    assert out.read_bytes() == before and os.listdir(out.parent) == ["splits.parquet"]
