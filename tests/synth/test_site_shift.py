"""``synth.site_shift``: one site's acquisition shift (kernel, noise, HU offset) and nothing else changes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pe_triage.config import ConfigError, SiteShift, SynthConfig, parse_config
from pe_triage.synth import generate_cohort

BASE = SynthConfig(sites=2, patients_per_site=3, slices=4, size=64, seed=3, write_tissue_maps=False)
SHIFT = SiteShift(sites=("site-b",), hu_offset=150.0, noise_scale=3.0, kernel="B70f")


def _series(root: Path, site: str) -> dict[str, pydicom.Dataset]:
    files = sorted((root / "sites" / site / "dicom").rglob("*"))
    return {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f) for f in files if f.is_file())}


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_shift_changes_only_the_shifted_site(tmp_path: Path) -> None:
    generate_cohort(tmp_path / "plain", BASE)
    generate_cohort(tmp_path / "shifted", dataclasses.replace(BASE, site_shift=SHIFT))
    a_plain, a_shift = _series(tmp_path / "plain", "site-a"), _series(tmp_path / "shifted", "site-a")
    assert all(a_plain[k].PixelData == a_shift[k].PixelData for k in a_plain)
    b_plain, b_shift = _series(tmp_path / "plain", "site-b"), _series(tmp_path / "shifted", "site-b")
    assert b_plain.keys() == b_shift.keys()
    assert {ds.ConvolutionKernel for ds in b_shift.values()} == {"B70f"}
    assert {ds.ConvolutionKernel for ds in b_plain.values()} != {"B70f"}
    diffs, noise = [], []
    for uid, ds in b_plain.items():
        before, after = _hu(ds), _hu(b_shift[uid])
        soft = (before > -200) & (before < 1000)  # away from the clipping at -1024 HU
        diffs.append(np.median(after[soft] - before[soft]))
        noise.append(np.std(after[soft] - before[soft]))
    assert 120 < np.median(diffs) < 180  # the offset, give or take the tripled noise
    assert np.median(noise) > 10  # noise added, not only an offset


def test_site_shift_from_yaml_and_bad_values(tmp_path: Path) -> None:
    cfg = parse_config("synth:\n  site_shift: {sites: [site-c], hu_offset: -100, noise_scale: 2, kernel: LUNG}\n")
    assert cfg.synth.site_shift == SiteShift(sites=("site-c",), hu_offset=-100.0, noise_scale=2.0, kernel="LUNG")
    with pytest.raises(ConfigError, match="noise_scale"):
        SiteShift(noise_scale=0.0)
    with pytest.raises(ValueError, match="site-z"):
        generate_cohort(tmp_path / "c", dataclasses.replace(BASE, site_shift=SiteShift(sites=("site-z",))))
