"""Site ingest on crafted input: bad files, duplicates, idempotence, increments, labels, atomicity."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from factories import ct_slice, pseudo, write, write_series

from pe_triage import schema as S
from pe_triage.config import IngestConfig
from pe_triage.ingest import IngestError, ingest_site
from pe_triage.ingest import site as site_mod

CFG = IngestConfig(workers=1)


def run(src: Path, out: Path, site: str = "test-site", **kw: object) -> dict:
    kw.setdefault("config", CFG)
    return ingest_site(site, str(src), str(out), pseudo=pseudo(site), **kw)  # type: ignore[arg-type]


def slices(out: Path) -> list[dict]:
    table = pads.dataset(out, format="parquet", partitioning="hive").to_table()
    return sorted(table.to_pylist(), key=lambda r: (r[S.SERIES_UID], r[S.SLICE_INDEX]))


def quarantine(out: Path, site: str = "test-site") -> list[dict]:
    return pq.read_table(out / "_quarantine" / f"site={site}" / "quarantine.parquet").to_pylist()


def snapshot(out: Path, pattern: str = "*.parquet") -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob(pattern))}


def test_slices_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    write_series(tmp_path / "src", 6)
    report = run(tmp_path / "src", tmp_path / "out")
    rows = slices(tmp_path / "out")
    assert report["files"] == {"seen": 6, "ingested": 6, "duplicates": 0, "quarantined": 0}
    assert [r[S.SLICE_INDEX] for r in rows] == list(range(6))
    assert [r[S.Z_MM] for r in rows] == sorted(r[S.Z_MM] for r in rows)
    assert [r[S.INSTANCE_NUMBER] for r in rows] == [6, 5, 4, 3, 2, 1]
    hu = S.decode_hu(rows[0][S.HU], rows[0][S.ROWS], rows[0][S.COLS])
    assert hu[0, 0] == -1000 and hu[16, 16] == 40


def test_bad_input_is_quarantined_and_the_run_completes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    good = write_series(src / "good", 4)
    (src / "empty.dcm").write_bytes(b"")
    (src / "notes.txt").write_text("not a DICOM file at all" * 20)
    truncated = good[0].read_bytes()
    (src / "truncated.dcm").write_bytes(truncated[: len(truncated) - 500])
    write(ct_slice(modality="MR", sop="9.9.1", series="9.9"), src / "mr.dcm")
    write(ct_slice(pixels=False, sop="9.8.1", series="9.8"), src / "nopix.dcm")
    write(ct_slice(BurnedInAnnotation="YES", sop="9.7.1", series="9.7"), src / "burned.dcm")
    shutil.copy(good[1], src / "copy-of-slice-1")  # same file, another name, no suffix
    write(ct_slice(sop="1.2.3.4.5.99", z=2.0, instance=99), src / "samez.dcm")  # another slice at z=2
    write(ct_slice(sop="1.2.3.4.5.98", z=9.0, size=48), src / "othersize.dcm")
    report = run(src, tmp_path / "out")

    reasons = {r[S.REASON] for r in quarantine(tmp_path / "out")}
    assert reasons == {
        "empty_file", "unreadable", "truncated", "not_ct", "no_pixels", "burned_in_annotation", "duplicate",
        "duplicate_position", "inconsistent_geometry",
    }
    f = report["files"]
    assert f["seen"] == 13 and f["ingested"] == 4 and f["duplicates"] == 1 and f["quarantined"] == 8
    assert f["seen"] == f["ingested"] + f["duplicates"] + f["quarantined"]
    rows = quarantine(tmp_path / "out")
    assert all(r[S.DETAIL] for r in rows)
    assert not any("copy-of" in r[S.PATH_PSEUDONYM] or ".dcm" in r[S.PATH_PSEUDONYM] for r in rows)  # no clear paths


def test_progress_counts_every_file_of_the_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Off a terminal, ingest logs its progress as ``ingest <site>`` lines: headers scanned, then files done,
    quarantined ones included, so the count ends at the number of files seen."""
    monkeypatch.setenv("PE_TRIAGE_PROGRESS", "log")
    src = tmp_path / "src"
    write_series(src / "a", 4)
    write_series(src / "b", 3, series="1.2.3.4.9")
    (src / "empty.dcm").write_bytes(b"")
    write(ct_slice(modality="MR", sop="9.9.1", series="9.9"), src / "mr.dcm")
    with caplog.at_level(logging.INFO, logger="pe_triage"):
        report = run(src, tmp_path / "out", config=IngestConfig(workers=1, scan_chunk_files=2))
    lines = [r.getMessage() for r in caplog.records]
    assert report["files"]["seen"] == 9
    assert any(m.startswith("ingest test-site: headers: 9 file in ") for m in lines), lines
    assert any(m.startswith("ingest test-site: 9 file in ") for m in lines), lines


def test_hospital_can_map_quarantine_back_to_its_files(tmp_path: Path) -> None:
    from pe_triage.ingest import quarantined_files

    write_series(tmp_path / "src" / "ok", 2)
    (tmp_path / "src" / "SMITH_JOHN" / "report.pdf").parent.mkdir()
    (tmp_path / "src" / "SMITH_JOHN" / "report.pdf").write_bytes(b"%PDF-1.4 not an image")
    run(tmp_path / "src", tmp_path / "out")
    assert b"SMITH" not in (tmp_path / "out" / "_quarantine" / "site=test-site" / "quarantine.parquet").read_bytes()
    rows = quarantined_files("test-site", str(tmp_path / "src"), str(tmp_path / "out"), pseudo=pseudo())
    assert [(r["path"], r[S.REASON]) for r in rows] == [("SMITH_JOHN/report.pdf", "unreadable")]


def test_two_series_mixed_in_one_folder(tmp_path: Path) -> None:
    write_series(tmp_path / "src", 3, series="1.2.3.4.5", name="a{:02d}")
    write_series(tmp_path / "src", 4, series="1.2.3.4.6", name="b{:02d}")
    report = run(tmp_path / "src", tmp_path / "out")
    assert report["dataset"]["series"] == 2 and report["dataset"]["slices"] == 7
    files = list((tmp_path / "out" / "site=test-site").glob("*.parquet"))
    assert len(files) == 2


def test_rerun_changes_nothing_and_increment_adds_only_new_slices(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_series(src, 5)
    run(src, out)
    before = snapshot(out)
    again = run(src, out)
    assert snapshot(out) == before
    assert again["files"]["ingested"] == 0 and again["duplicates"]["already_ingested"] == 5
    # a later export adds two slices to the same series and a new series
    write(ct_slice(sop="1.2.3.4.5.50", z=-1.0, instance=50), src / "later" / "x1")
    write(ct_slice(sop="1.2.3.4.5.51", z=5.0, instance=51), src / "later" / "x2")
    write_series(src / "other", 2, series="1.2.3.4.7")
    report = run(src, out)
    assert report["files"]["ingested"] == 4 and report["duplicates"]["already_ingested"] == 5
    rows = [r for r in slices(out) if r[S.SERIES_UID] == pseudo()("series", "1.2.3.4.5")]
    assert [r[S.SLICE_INDEX] for r in rows] == list(range(7))
    assert [r[S.Z_MM] for r in rows] == [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert len({r[S.SOP_UID] for r in slices(out)}) == len(slices(out)) == 9


def test_changed_file_with_known_uid_is_a_conflict_not_an_overwrite(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    files = write_series(src, 3)
    run(src, out)
    before = snapshot(out / "site=test-site")
    write(ct_slice(sop="1.2.3.4.5.2", z=1.0, instance=2, hu=np.full((32, 32), 300)), files[1])
    report = run(src, out)
    assert report["quarantine_reasons"] == {"conflicting_uid": 1}
    assert snapshot(out / "site=test-site") == before


def test_transcoded_copy_is_a_duplicate(tmp_path: Path) -> None:
    from pydicom.uid import RLELossless

    src = tmp_path / "src"
    files = write_series(src, 3)
    import pydicom

    ds = pydicom.dcmread(files[0])
    ds.compress(RLELossless, generate_instance_uid=False)  # a PACS transcode keeps the UID
    write(ds, src / "reexport" / "rle.dcm")
    report = run(src, tmp_path / "out")
    assert report["files"]["ingested"] == 3 and report["files"]["duplicates"] == 1
    assert "other encoding" in quarantine(tmp_path / "out")[0][S.DETAIL]


def test_interrupted_run_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_series(src, 3)
    write_series(src / "b", 3, series="1.2.3.4.8")
    real = site_mod.write_series
    calls = []

    def crash_on_second(task):  # type: ignore[no-untyped-def]
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(site_mod, "write_series", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(src, out)
    assert not list((out).glob("site=*/*.parquet"))
    monkeypatch.setattr(site_mod, "write_series", real)
    report = run(src, out)  # the re-run cleans up and completes
    assert report["files"]["ingested"] == 6
    assert not list((out / "_staging").rglob("*.parquet"))


def test_dataset_refuses_another_key(tmp_path: Path) -> None:
    from pe_triage.dicom import Pseudonymizer

    write_series(tmp_path / "src", 2)
    run(tmp_path / "src", tmp_path / "out")
    with pytest.raises(IngestError, match="another key"):
        ingest_site("test-site", str(tmp_path / "src"), str(tmp_path / "out"),
                    pseudo=Pseudonymizer(b"some other deployment secret", "test-site"), config=CFG)


def test_bad_site_name_and_missing_source(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="site name"):
        ingest_site("St Mary's", str(tmp_path), str(tmp_path / "out"), pseudo=pseudo("St Mary's"), config=CFG)
    with pytest.raises(FileNotFoundError):
        run(tmp_path / "nope", tmp_path / "out")


MANIFEST = """patient_id,study_uid,series_uid,sop_uid,instance_number,label,diagnosis
PAT-0001,1.2.3.4,,,,,pe
PAT-0001,1.2.3.4,1.2.3.4.5,1.2.3.4.5.2,,pe,
PAT-0001,1.2.3.4,1.2.3.4.5,,3,pe,
PAT-0001,1.2.3.4,1.2.3.4.5,1.2.3.4.5.77,,other,
PAT-0002,1.2.9,,,,,wnl
"""


def test_labels_join_and_mismatches_are_reported(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_series(src, 5)  # instance numbers 5..1 for z 0..4
    (tmp_path / "labels.csv").write_text(MANIFEST)
    report = run(src, out, labels=str(tmp_path / "labels.csv"))
    by_instance = {r[S.INSTANCE_NUMBER]: r[S.LABEL] for r in slices(out)}
    assert by_instance == {1: "wnl", 2: "wnl", 3: "pe", 4: "pe", 5: "wnl"}  # sop .2 is instance 4
    unmatched = report["labels"]["unmatched_rows"]
    assert [u["row"] for u in unmatched] == [5, 6]  # the unknown SOP, and a patient with no slices
    assert "MRN" not in json.dumps(report) and "PAT-000" not in json.dumps(report)
    with pytest.raises(IngestError, match="unmatched"):
        run(src, tmp_path / "strict", labels=str(tmp_path / "labels.csv"), config=IngestConfig(workers=1, strict_labels=True))
    assert not list((tmp_path / "strict").glob("site=*/*.parquet"))


def test_indeterminate_slices_are_labelled_counted_and_checked_against_the_diagnosis(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for n, study in ((1, "1.2.3.4"), (2, "1.2.8"), (3, "1.2.9")):
        write_series(src / f"p{n}", 3, series=f"{study}.5", patient=f"PAT-000{n}", study=study)
    (tmp_path / "labels.csv").write_text(
        "patient_id,sop_uid,label,diagnosis\n"
        "PAT-0001,,,pe\nPAT-0001,1.2.3.4.5.2,pe,\nPAT-0001,1.2.3.4.5.3,indeterminate,\n"  # PE with an uncertain edge
        "PAT-0002,,,wnl\nPAT-0002,1.2.8.5.1,Indeterminate,\n"  # a WNL patient has WNL slices only
        "PAT-0003,,,indeterminate\nPAT-0003,1.2.9.5.2,indeterminate,\n"  # an indeterminate exam
    )
    report = run(src, tmp_path / "out", labels=str(tmp_path / "labels.csv"))
    labels = {r[S.SOP_UID]: r[S.LABEL] for r in slices(tmp_path / "out")}
    assert sorted(labels.values()) == ["indeterminate"] * 3 + ["pe"] + ["wnl"] * 5
    assert report["dataset"]["labels"] == {"indeterminate": 3, "other": 0, "pe": 1, "wnl": 5}
    inconsistent = report["labels"]["inconsistent_patients"]
    assert [(i["row"], i["diagnosis"], i["slice_labels"]) for i in inconsistent] == [(5, "wnl", ["indeterminate", "wnl"])]
    assert report["labels"]["unmatched_rows"] == []


def test_corrected_manifest_relabels_existing_slices(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    write_series(src, 3)
    (tmp_path / "v1.csv").write_text("patient_id,diagnosis\nPAT-0001,wnl\n")
    run(src, out, labels=str(tmp_path / "v1.csv"))
    assert {r[S.LABEL] for r in slices(out)} == {"wnl"}
    (tmp_path / "v2.csv").write_text("patient_id,sop_uid,label,diagnosis\nPAT-0001,,,other\nPAT-0001,1.2.3.4.5.1,other,\n")
    report = run(src, out, labels=str(tmp_path / "v2.csv"))
    assert report["dataset"]["series_written"] == 1
    assert sorted(r[S.LABEL] for r in slices(out)) == ["other", "wnl", "wnl"]


def test_manifest_errors_name_the_rows(tmp_path: Path) -> None:
    from pe_triage.labels import ManifestError

    write_series(tmp_path / "src", 2)
    (tmp_path / "bad.csv").write_text("patient_id,sop_uid,label\nPAT-0001,1.2.3.4.5.1,embolism\n,1.2,pe\n")
    with pytest.raises(ManifestError, match=r"row 2, column label: not one of .*; row 3: empty patient_id$"):
        run(tmp_path / "src", tmp_path / "out", labels=str(tmp_path / "bad.csv"))


def test_parallel_workers_give_the_same_dataset(tmp_path: Path) -> None:
    write_series(tmp_path / "src", 4)
    write_series(tmp_path / "src" / "b", 4, series="1.2.3.4.9")
    run(tmp_path / "src", tmp_path / "one")
    two = run(tmp_path / "src", tmp_path / "two", config=IngestConfig(workers=2, min_files_per_worker=1, scan_chunk_files=3))
    assert two["timing"]["workers"] == 2
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")


def test_a_small_site_starts_no_more_workers_than_it_has_work_for(tmp_path: Path) -> None:
    write_series(tmp_path / "src", 6)
    report = run(tmp_path / "src", tmp_path / "out", config=IngestConfig(workers=4, min_files_per_worker=3))
    assert report["timing"]["workers"] == 2 and report["files"]["ingested"] == 6
    report = run(tmp_path / "src", tmp_path / "again", config=IngestConfig(workers=4))  # 500 files a worker
    assert report["timing"]["workers"] == 1
