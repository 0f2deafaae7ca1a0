"""Ingest of real scanner output (../shared/data/real-ct): ordering, HU, decoding, UID defects."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from factories import pseudo

from pe_triage import schema as S
from pe_triage.config import IngestConfig
from pe_triage.ingest import ingest_site

pytestmark = pytest.mark.slow


def ingest(site: str, src: Path, out: Path) -> tuple[dict, list[dict], list[dict]]:
    report = ingest_site(site, str(src), str(out), pseudo=pseudo(site), config=IngestConfig(workers=2, min_files_per_worker=1))
    rows = pads.dataset(out, format="parquet", partitioning="hive").to_table().to_pylist()
    quarantine = pq.read_table(out / "_quarantine" / f"site={site}" / "quarantine.parquet").to_pylist()
    return report, sorted(rows, key=lambda r: r[S.SLICE_INDEX]), quarantine


def test_lidc_series_in_z_order_with_air_at_minus_1000(real_ct: Path, tmp_path: Path) -> None:
    report, rows, quarantine = ingest("lidc", real_ct / "lidc-idri-0002", tmp_path / "out")
    assert report["files"]["ingested"] == 261 and len(rows) == 261
    assert {q[S.REASON] for q in quarantine} == {"unreadable"}  # the XML reads and the attribution text
    z = np.array([r[S.Z_MM] for r in rows])
    assert np.all(np.diff(z) > 0) and np.allclose(np.diff(z), 1.25)
    instance = np.array([r[S.INSTANCE_NUMBER] for r in rows])
    assert np.all(np.diff(instance) < 0)  # InstanceNumber runs against z: sorted by position
    hu = S.decode_hu(rows[130][S.HU], 512, 512)
    air = hu[5:40, 200:300]  # above the patient, inside the field of view
    assert abs(float(np.median(air)) + 1000) < 30
    assert hu.min() >= -1024  # padding (-2000) became air
    assert rows[0][S.MANUFACTURER] == "GE MEDICAL SYSTEMS" and rows[0][S.PIXEL_SPACING_ROW] == pytest.approx(0.681641)


def test_transfer_syntax_folder_quarantines_what_it_cannot_use(real_ct: Path, tmp_path: Path) -> None:
    report, rows, quarantine = ingest("ts", real_ct / "transfer-syntaxes", tmp_path / "out")
    reasons = {q[S.REASON] for q in quarantine}
    assert "lossy_compression" in reasons and "duplicate" in reasons
    assert report["files"]["seen"] == 19
    # the lossless encodings of CTImage.dcm share one SOP UID and identical HU: one slice, the rest duplicates
    assert report["duplicates"]["same_content_or_pixels"] == 9
    assert len({r[S.SOP_UID] for r in rows}) == len(rows) == 3


def test_empty_uids_are_derived_and_flagged(real_ct: Path, tmp_path: Path) -> None:
    report, rows, _ = ingest("tseg", real_ct / "totalsegmentator-example", tmp_path / "out")
    assert report["files"]["ingested"] == 20
    assert all(r[S.UIDS_DERIVED] for r in rows)
    assert len({r[S.SERIES_UID] for r in rows}) == 1
    assert report["dataset"]["slices_with_derived_uids"] == 20
    z = [r[S.Z_MM] for r in rows]
    assert z == sorted(z) and np.allclose(np.diff(z), 2.0)


def test_real_series_ingests_identically_from_a_renamed_copy(real_ct: Path, tmp_path: Path) -> None:
    src = tmp_path / "export"
    src.mkdir()
    for i, f in enumerate(sorted((real_ct / "totalsegmentator-example").iterdir())):
        shutil.copy(f, src / f"{i:03d}")
    _, rows_a, _ = ingest("tseg", real_ct / "totalsegmentator-example", tmp_path / "a")
    _, rows_b, _ = ingest("tseg", src, tmp_path / "b")
    assert [r[S.SOURCE_HMAC] for r in rows_a] == [r[S.SOURCE_HMAC] for r in rows_b]
    assert [r[S.SOP_UID] for r in rows_a] == [r[S.SOP_UID] for r in rows_b]
