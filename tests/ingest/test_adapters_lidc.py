"""LIDC-IDRI: the real series' reading XML converted, and ingest joining the labels to the slices the
XML's readers outlined (checked against the XML's own imageZposition values)."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from factories import pseudo

from pe_triage import schema as S
from pe_triage.config import IngestConfig, LabelsConfig
from pe_triage.ingest import ingest_site
from pe_triage.ingest.adapters import convert_labels

NS = {"n": "http://www.nih.gov"}


def _xml_nodules(xml: Path) -> list[tuple[int, int, set[float]]]:
    """(reader, outline points, z positions) of every unblindedReadNodule, read independently here."""
    root = ET.parse(xml).getroot()
    out = []
    for reader, session in enumerate(root.findall("n:readingSession", NS)):
        for nodule in session.findall("n:unblindedReadNodule", NS):
            rois = nodule.findall("n:roi", NS)
            points = sum(len(r.findall("n:edgeMap", NS)) for r in rois)
            out.append((reader, points, {float(r.findtext("n:imageZposition", namespaces=NS) or "") for r in rois}))
    return out


def test_the_xml_of_the_real_series_converts_without_loss(real_ct: Path, tmp_path: Path) -> None:
    report = convert_labels("lidc", [str(real_ct / "lidc-idri-0002")], str(tmp_path / "m.csv"))
    assert report["counts"] == {"marks_lt_3mm": 26, "nodules_kept": 1, "non_nodule_marks": 25, "readers": 4}
    assert report["problems_total"] == 0 and report["diagnoses"] == {"other": 1}
    fewer = convert_labels("lidc", [str(real_ct / "lidc-idri-0002")], str(tmp_path / "m3.csv"), LabelsConfig(min_readers=3))
    assert fewer["slice_labels"]["other"] == 0 and fewer["counts"]["nodules_below_min_readers"] == 1


def test_hostile_or_foreign_xml_is_counted_not_parsed(tmp_path: Path) -> None:
    folder = tmp_path / "LIDC-IDRI-0001"
    folder.mkdir()
    (folder / "bomb.xml").write_text('<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
                                     '<LidcReadMessage>&b;</LidcReadMessage>')
    (folder / "other.xml").write_text("<svg/>")
    (folder / "cut.xml").write_text("<LidcReadMessage><readingSession>")
    report = convert_labels("lidc", [str(folder)], str(tmp_path / "m.csv"))
    assert report["excluded"] == {"xml_unreadable_or_refused": 2, "xml_not_an_lidc_read_message": 1}
    assert report["patients"] == 0


@pytest.mark.slow
def test_ingest_labels_exactly_the_slices_of_nodules_two_readers_outlined(real_ct: Path, tmp_path: Path) -> None:
    src = tmp_path / "LIDC-IDRI-0002"
    shutil.copytree(real_ct / "lidc-idri-0002", src)
    manifest = tmp_path / "lidc.csv"
    convert_labels("lidc", [str(src / "071.xml")], str(manifest))
    report = ingest_site("lidc", str(src), str(tmp_path / "slices"), pseudo=pseudo("lidc"), labels=str(manifest),
                         config=IngestConfig(workers=2, min_files_per_worker=1, strict_labels=True))
    assert report["labels"]["unmatched_rows"] == [] and report["labels"]["inconsistent_patients"] == []
    rows = pads.dataset(tmp_path / "slices", partitioning="hive").to_table().to_pylist()
    assert len(rows) == 261 and {r[S.PATIENT_ID] for r in rows} == {pseudo("lidc")("patient", "LIDC-IDRI-0002")}

    nodules = _xml_nodules(src / "071.xml")
    outlined = [(reader, z) for reader, points, z in nodules if points > 1]  # >= 3 mm: outlined
    assert len({reader for reader, _ in outlined}) == 2 and set.intersection(*(z for _, z in outlined))  # one nodule, 2 readers
    expected_other = set.union(*(z for _, z in outlined))
    expected_indeterminate = set.union(*(z for _, points, z in nodules if points == 1)) - expected_other
    by_label: dict[str, set[float]] = {}
    for r in rows:
        by_label.setdefault(r[S.LABEL], set()).add(round(r[S.Z_MM], 3))
    assert by_label["other"] == expected_other and len(expected_other) == 28
    assert by_label["indeterminate"] == expected_indeterminate
    assert len(by_label["wnl"]) == 261 - 28 - len(expected_indeterminate)
