"""Preprocessing the synthetic cohort: every lesion stays inside its crop, the windows show it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from factories import truth

from pe_triage import schema as S
from pe_triage.config import PreprocessConfig
from pe_triage.preprocess import preprocess

pytestmark = pytest.mark.slow


def test_lesions_stay_inside_the_dynamic_crop(onboarded: tuple[Path, Path, dict], tmp_path: Path) -> None:
    cohort, slices, _ = onboarded
    report = preprocess(str(slices), str(tmp_path / "windows"), config=PreprocessConfig(size=64, workers=2))
    expected = truth(cohort)
    assert report["slices_written"] == len(expected) and report["slices_skipped"] == []
    rows = pads.dataset(tmp_path / "windows", format="parquet", partitioning="hive").to_table(
        columns=[S.SOURCE_HMAC, S.LABEL, S.CROP_Y0, S.CROP_Y1, S.CROP_X0, S.CROP_X1, S.LUNG_FOUND]).to_pylist()
    by_sha = {r[S.SOURCE_HMAC]: r for r in rows}
    lesion_slices = 0
    for t in expected:
        row = by_sha[t[S.SOURCE_HMAC]]
        assert row[S.LABEL] == t[S.LABEL]
        mask = np.frombuffer(t[S.T_MASK], np.uint8).reshape(t[S.ROWS], t[S.COLS])
        if mask.any():
            lesion_slices += 1
            inside = mask[row[S.CROP_Y0]:row[S.CROP_Y1], row[S.CROP_X0]:row[S.CROP_X1]].sum()
            assert inside == mask.sum(), f"{t[S.T_LESION]} cut by the crop"
    assert lesion_slices > 20
    assert np.mean([r[S.LUNG_FOUND] for r in rows]) > 0.7  # most of a chest series shows lung
