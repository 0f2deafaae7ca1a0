"""The monitoring store: a record per triaged study with the acquisition fields and score summaries
but no identifier anywhere in the files, appends by new files (concurrent writers never clash), S3
(moto) as well as a folder, and a write failure that never fails the triage."""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, date, datetime
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from monitoring.conftest import NAME, PATIENT, STUDY

from pe_triage import schema as S
from pe_triage.config import ConfigError, MonitorConfig
from pe_triage.monitoring import MonitorStore, record_triage, study_records, write_failures
from pe_triage.predict import Triage, triage_report


def report_of(triage: Triage, study: list[Path]) -> dict:
    frame, summary = triage.predict_dicom([str(p) for p in study])
    return triage_report(frame, triage, model="models:/pe-triage@champion", input_summary=summary) | {"model_version": 4}


def identifiers(study: list[Path]) -> list[str]:
    uids = [STUDY, f"{STUDY}.1", PATIENT, NAME, "DOE", study[0].parent.name, str(study[0].parent)]
    return uids + [p.name for p in study]


def test_a_record_keeps_acquisition_and_scores_and_no_identifier(flagging: Triage, study: list[Path], tmp_path: Path) -> None:
    store, report, before = tmp_path / "store", report_of(flagging, study), datetime.now(UTC).date()
    record_triage(MonitorConfig(store=str(store), site="north"), report, source="predict")
    files = sorted(store.rglob("*.parquet"))
    assert len(files) == 1 and files[0].parent.name in {f"day={d.isoformat()}" for d in (before, datetime.now(UTC).date())}
    (row,) = MonitorStore(str(store)).read().to_dict("records")
    assert (row["site"], row["source"], row["model"]) == ("north", "predict", "models:/pe-triage@champion")
    assert row["model_version"] == "4"
    assert (row[S.MANUFACTURER], row[S.KERNEL], row[S.KVP]) == ("ACME MEDICAL", "FC52", 100.0)
    assert row["n_slices"] == row["n_scored"] == row["flagged_slices"] == 4 and row["study_triage"] == "pe"
    assert 0 <= row["p_pe_q50"] <= row["p_pe_max"] <= 1 and json.loads(row["quarantine"]) == {}
    # nothing of the study's identity: not in the raw bytes, the decoded values, the metadata or the path
    table = pq.read_table(files[0])
    text = json.dumps(table.to_pylist(), default=str) + str(table.schema.metadata) + str(files[0].relative_to(store))
    for marker in identifiers(study):
        assert marker not in text and marker.encode() not in files[0].read_bytes(), marker


def test_concurrent_writers_write_separate_files_and_every_record(tmp_path: Path) -> None:
    store, now = MonitorStore(str(tmp_path / "store")), datetime(2026, 11, 3, 9, tzinfo=UTC)
    report = {"model": "m", "model_version": 1, "input": {}, "studies": [
        {"triage": "wnl", "slices": 1, "flagged_slices": [], "series": [{"slices": [
            {"slice_index": 0, "p_disease": 0.1, "p_pe": 0.2, "triage": "wnl"}]}]}]}

    def writer(n: int) -> None:
        for _ in range(5):
            store.append(study_records(report, site=f"site-{n}", source="test", now=now))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(list((tmp_path / "store" / "day=2026-11-03").glob("*.parquet"))) == 30
    frame = store.read(date(2026, 11, 3), date(2026, 11, 3))
    assert len(frame) == 30 and frame["site"].value_counts().to_dict() == {f"site-{n}": 5 for n in range(6)}
    assert store.read(date(2026, 11, 4)).empty and len(store.read(until=date(2026, 11, 3))) == 30


def test_the_store_works_on_s3(s3_endpoint: str, flagging: Triage, study: list[Path]) -> None:
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="monitoring")
    config = MonitorConfig(store="s3://monitoring/records", site="east")
    record_triage(config, report_of(flagging, study), source="serve")
    record_triage(config, report_of(flagging, study), source="serve")
    frame = MonitorStore(config.store).read()
    assert len(frame) == 2 and set(frame["site"]) == {"east"} and set(frame[S.KERNEL]) == {"FC52"}


def test_a_failed_write_is_logged_and_counted_never_raised(flagging: Triage, study: list[Path], tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = write_failures()
    with caplog.at_level(logging.WARNING):
        record_triage(MonitorConfig(store=str(blocker / "store")), report_of(flagging, study), source="predict")
    assert write_failures() == before + 1
    assert "monitoring record not written" in caplog.text
    assert not any(marker in caplog.text for marker in identifiers(study))


def test_no_store_means_off_and_a_bad_site_label_is_refused(tmp_path: Path) -> None:
    record_triage(MonitorConfig(), {"studies": []}, source="predict")  # off: nothing to write, nothing raised
    with pytest.raises(ConfigError, match="monitor.site"):
        MonitorConfig(site="a/b")
