"""HU histogram summaries (issue 23 item 3): predict summarises its input's HU inside the lung crop
into each monitoring record, the drift report's reference summarises the training studies, and a
site whose HU scale is off by +100 is flagged while a calibrated one is not."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pe_triage import schema as S
from pe_triage.config import CropConfig, MonitorConfig
from pe_triage.hu_summary import BINS, EMPTY, HuSummary, slice_summary
from pe_triage.monitoring import MonitorStore, study_records
from pe_triage.monitoring.drift import drift_report, reference_acquisition
from pe_triage.predict import Triage, triage_report

WHEN = datetime(2026, 11, 2, 12, tzinfo=UTC)


def study_summaries(slices: Path, site: str, offset: float) -> list[HuSummary]:
    """Per study of ``site``: every slice's HU (plus ``offset``) inside its lung crop."""
    out = []
    for path in sorted((slices / f"{S.SITE}={site}").glob("*.parquet")):
        total = EMPTY
        for row in pq.read_table(path).to_pylist():
            hu = S.decode_hu(row[S.HU], row[S.ROWS], row[S.COLS]).astype(np.float32) + offset
            one = slice_summary(hu, (row[S.PIXEL_SPACING_ROW], row[S.PIXEL_SPACING_COL]), CropConfig())
            total = HuSummary(total.counts + one.counts)
        out.append(total)
    return out


def records(label: str, summaries: list[HuSummary], acquisition: pd.DataFrame) -> list[dict]:
    """Monitoring records with the HU summaries and the reference's acquisition fields (no acquisition drift)."""
    first = acquisition.iloc[0]
    return [{"time": WHEN, "site": label, "source": "test", "model": "pe-triage", "model_version": "1",
             **{f: first[f] for f in (S.MANUFACTURER, S.KERNEL, S.KVP, S.PIXEL_SPACING_ROW, S.SLICE_THICKNESS)},
             "hu_median": s.median(), "hu_fractions": s.fractions(), "n_slices": 24, "n_scored": 24, "flagged_slices": 0,
             "study_triage": "wnl", "quarantine": "{}"} for s in summaries]


def test_a_site_off_by_100_hu_is_flagged_and_a_calibrated_one_is_not(onboarded: tuple[Path, Path, dict],
                                                                      tmp_path: Path) -> None:
    _, slices, _ = onboarded
    reference = reference_acquisition(str(slices))
    assert reference["hu_fractions"].notna().all() and len(reference["hu_fractions"].iloc[0]) == BINS
    assert reference["hu_median"].between(-900, 200).all()
    store = MonitorStore(str(tmp_path / "store"))
    site_b = reference[reference[S.SITE] == "site-b"]
    store.append(records("calibrated", study_summaries(slices, "site-b", 0), site_b))
    store.append(records("shifted", study_summaries(slices, "site-b", 100), site_b))
    report = drift_report(store.read(), store.read().iloc[0:0], reference, MonitorConfig(), since=date(2026, 11, 1),
                          until=None)
    calm, shifted = report["sites"]["calibrated"], report["sites"]["shifted"]
    assert calm["input_reference"] == "all sites" and "hu_fractions" not in calm["flagged"]
    assert calm["input"]["hu_fractions"]["psi"] < MonitorConfig().hu_psi_threshold
    assert "hu_fractions" in shifted["flagged"] and shifted["input"]["hu_fractions"]["psi"] > 5 * MonitorConfig().hu_psi_threshold
    # the calibrated site's KS (0.42 on 4 studies) alone would flag it; its median is 7 HU off, the shifted one's 87
    assert "hu_median" in shifted["flagged"] and "hu_median" not in calm["flagged"]
    moved = shifted["input"]["hu_fractions"]["value"] - calm["input"]["hu_fractions"]["value"]
    assert 80 < moved < 120, moved  # the bin masses' median HU moves with the offset


def test_a_site_is_compared_with_its_own_training_studies(onboarded: tuple[Path, Path, dict], tmp_path: Path) -> None:
    _, slices, _ = onboarded
    reference = reference_acquisition(str(slices))
    store = MonitorStore(str(tmp_path / "store"))
    store.append(records("site-c", study_summaries(slices, "site-c", 0), reference[reference[S.SITE] == "site-c"]))
    report = drift_report(store.read(), store.read().iloc[0:0], reference, MonitorConfig(), since=date(2026, 11, 1),
                          until=None)
    site = report["sites"]["site-c"]
    assert site["input_reference"] == "site" and not {"hu_fractions", "hu_median"} & set(site["flagged"])
    assert site["input"]["hu_fractions"]["psi"] < 0.02  # the same studies: only the reference's slice sample differs


def test_predict_summarises_the_hu_of_its_input_into_the_record(flagging: Triage, study: list[Path], tmp_path: Path) -> None:
    frame, summary = flagging.predict_dicom([str(p) for p in study])
    fractions = summary["hu"]["fractions"]
    assert len(fractions) == BINS and abs(sum(fractions) - 1) < 1e-9 and -1000 <= summary["hu"]["median"] <= 1000
    store = MonitorStore(str(tmp_path / "store"))
    store.append(study_records(triage_report(frame, flagging, model="pe-triage", input_summary=summary), site="north",
                               source="predict", now=WHEN))
    (record,) = store.read().to_dict("records")
    assert list(record["hu_fractions"]) == pytest.approx(fractions)
    assert record["hu_median"] == pytest.approx(summary["hu"]["median"])


def test_a_reference_without_pixels_has_no_hu_features(tmp_path: Path) -> None:
    root = tmp_path / "slices" / "site=a"
    root.mkdir(parents=True)
    frame = pd.DataFrame({S.STUDY_UID: ["s1", "s2"], S.MANUFACTURER: ["GE", "GE"], S.KERNEL: ["STANDARD"] * 2,
                          S.KVP: [120.0, 120.0], S.PIXEL_SPACING_ROW: [0.7, 0.7], S.SLICE_THICKNESS: [1.0, 1.0]})
    frame.to_parquet(root / "part-0.parquet")
    reference = reference_acquisition(str(tmp_path / "slices"))
    assert "hu_median" not in reference.columns
    current = pd.DataFrame(records("a", [EMPTY], reference))
    report = drift_report(current, current.iloc[0:0], reference, MonitorConfig(), since=date(2026, 11, 1), until=None)
    assert "hu_fractions" not in report["sites"]["a"]["input"] and "hu_median" not in report["sites"]["a"]["input"]
