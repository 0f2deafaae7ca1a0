"""Synthetic multi-site cohort → ingest: counts, labels, HU per tissue, and no PHI in any output."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from factories import truth

from pe_triage import schema as S
from pe_triage.schema import Tissue

pytestmark = pytest.mark.slow

#: where each tissue's mean HU must land after ingest (generated value ± noise and partial volume)
TISSUE_HU = {
    Tissue.AIR: (-1010, -960),  # noise below -1024 HU is clipped, which lifts the mean a little
    Tissue.FAT: (-160, -60),
    Tissue.MUSCLE: (20, 70),
    Tissue.LUNG: (-880, -800),
    Tissue.CONTRAST_BLOOD: (180, 420),
    Tissue.BONE: (250, 1100),
    Tissue.PE: (10, 100),
}


def test_every_generated_slice_is_ingested_with_its_label(onboarded: tuple[Path, Path, dict]) -> None:
    cohort, slices, reports = onboarded
    expected = truth(cohort)
    rows = pads.dataset(slices, format="parquet", partitioning="hive").to_table(columns=S.SLICES_META_COLUMNS).to_pylist()
    assert len(rows) == len(expected) == 3 * 4 * 24
    for site, report in reports.items():
        assert report["files"]["quarantined"] == 0 and report["files"]["duplicates"] == 0, site
        assert report["labels"]["unmatched_rows"] == [] and report["labels"]["inconsistent_patients"] == []
    by_sha = {r[S.SOURCE_HMAC]: r for r in rows}
    assert Counter(by_sha[t[S.SOURCE_HMAC]][S.LABEL] for t in expected) == Counter(t[S.LABEL] for t in expected)
    assert all(by_sha[t[S.SOURCE_HMAC]][S.LABEL] == t[S.LABEL] for t in expected)
    assert {r[S.TRANSFER_SYNTAX] for r in rows} >= {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"}
    for series in {r[S.SERIES_UID] for r in rows}:
        z = [r[S.Z_MM] for r in sorted((r for r in rows if r[S.SERIES_UID] == series), key=lambda r: r[S.SLICE_INDEX])]
        assert z == sorted(z) and len(set(z)) == len(z)


def test_hu_per_tissue_matches_what_was_generated(onboarded: tuple[Path, Path, dict]) -> None:
    cohort, slices, _ = onboarded
    table = pads.dataset(slices, format="parquet", partitioning="hive").to_table(
        columns=[S.SITE, S.SOURCE_HMAC, S.ROWS, S.COLS, S.HU])
    pixels = {sha: (site, hu, r, c) for site, sha, r, c, hu in zip(*(table.column(n).to_pylist() for n in
              (S.SITE, S.SOURCE_HMAC, S.ROWS, S.COLS, S.HU)), strict=True)}
    for site in ("site-a", "site-b", "site-c"):  # three pixel conventions must all land on the same HU
        sums: dict[Tissue, list[float]] = {t: [] for t in TISSUE_HU}
        for t in truth(cohort):
            if t[S.SITE] != site or t[S.T_TISSUE] is None:
                continue
            _, planes, rows, cols = pixels[t[S.SOURCE_HMAC]]
            hu = S.decode_hu(planes, rows, cols).astype(np.float64)
            tissue = np.frombuffer(t[S.T_TISSUE], np.uint8).reshape(rows, cols)
            for code in TISSUE_HU:
                values = hu[tissue == code]
                if values.size:
                    sums[code].append(float(values.mean()))
        for code, (lo, hi) in TISSUE_HU.items():
            if sums[code]:
                mean = float(np.mean(sums[code]))
                assert lo <= mean <= hi, f"{site} {code.name}: mean {mean:.0f} HU outside [{lo}, {hi}]"
        assert sums[Tissue.LUNG] and sums[Tissue.CONTRAST_BLOOD]


def _strings_in_parquet(path: Path) -> bytes:
    """Every value and every metadata entry of a Parquet file, decompressed, as one byte string."""
    parts: list[bytes] = []
    pf = pq.ParquetFile(path)
    for key, value in (pf.schema_arrow.metadata or {}).items():
        parts += [key, value]
    for column in pf.read().columns:
        for value in column.to_pylist():
            parts.append(value if isinstance(value, bytes) else str(value).encode())
    return b"\n".join(parts)


def test_no_phi_in_any_output(onboarded: tuple[Path, Path, dict]) -> None:
    cohort, slices, reports = onboarded
    phi = json.loads((cohort / "truth" / "phi.json").read_text())
    needles = {s for s in phi["strings"] + phi.get("uids", []) if len(s) >= 6}
    assert len(needles) > 20
    blobs = []
    for path in sorted(slices.rglob("*")):
        if path.is_file():
            blobs.append((path, path.read_bytes()))
            if path.suffix == ".parquet":
                blobs.append((path, _strings_in_parquet(path)))
    blobs.append((Path("reports"), json.dumps(reports).encode()))
    for path, blob in blobs:
        for needle in needles:
            for variant in {needle, needle.upper(), needle.lower()}:
                assert variant.encode() not in blob, f"PHI {needle!r} found in {path}"
