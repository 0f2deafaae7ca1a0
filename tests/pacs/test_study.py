"""The result objects of a study's triage: the SR's finding, probabilities, image references, model
and disclaimer; the key image of the most suspicious slice; identifiers copied from the source and
nowhere else; fresh UIDs under the configured root; clear errors on unusable studies."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import ct_slice, write, write_series
from pacs.pacs_servers import dciodvfy_errors, tiny_triage
from pydicom import Dataset, dcmread

from pe_triage.config import ConfigError, IngestConfig, PacsConfig
from pe_triage.pacs import PacsError, StudyResult, triage_folder
from pe_triage.pacs.source import ordered_slices
from pe_triage.predict import Triage

INGEST = IngestConfig(workers=1)
PACS = PacsConfig(uid_root="1.2.826.0.1.3680043.10.1234.", disclaimer="TEST DISCLAIMER: not for diagnosis")
PATIENT, NAME, STUDY = "PAT-0001", "DOE^JANE", "1.2.3.4"


def items(node: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    for item in node.get("ContentSequence", []):
        yield item
        yield from items(item)


def concept(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def finding(sr: Dataset) -> str:
    return next(str(i.ConceptCodeSequence[0].CodeMeaning) for i in items(sr) if concept(i) == "121071")


def referenced_sops(sr: Dataset) -> list[str]:
    return [str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in items(sr) if i.ValueType == "IMAGE"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six slices whose instance numbers run against z, as many scanners write them."""
    folder = tmp_path_factory.mktemp("pacs-study")
    write_series(folder, 6, size=96, study=STUDY, patient=PATIENT)
    return folder


@pytest.fixture(scope="module")
def flagged(flagging: Triage, study: Path) -> StudyResult:
    return triage_folder(study, flagging, model="pe-triage", version="7", ingest=INGEST, config=PACS)


def test_the_sr_holds_the_finding_model_disclaimer_and_references_the_flagged_slices(flagged: StudyResult) -> None:
    sr = flagged.objects[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert finding(sr) == "PE suspected" and flagged.report["studies"][0]["triage"] == "pe"
    texts = {str(i.TextValue) for i in items(sr) if i.ValueType == "TEXT"}
    assert {"TEST DISCLAIMER: not for diagnosis", "pe-triage", "7"} <= texts  # disclaimer, algorithm name + version
    # every slice is flagged: one reference per slice in the study group and one group per slice
    assert sorted(set(referenced_sops(sr))) == [f"1.2.3.4.5.{i}" for i in range(1, 7)]
    probabilities = [float(i.MeasuredValueSequence[0].NumericValue) for i in items(sr) if i.ValueType == "NUM"]
    assert len(probabilities) == 2 * (1 + 6) and all(0 <= p <= 1 for p in probabilities)


def test_the_most_suspicious_slice_is_the_key_image_and_its_probability_is_the_reports(flagged: StudyResult) -> None:
    key = flagged.objects[1]
    slices = flagged.report["studies"][0]["series"][0]["slices"]
    top = max(slices, key=lambda s: s["p_pe"])
    # write_series: slice_index i (z order) is SOP 1.2.3.4.5.(i+1)
    assert key.SourceImageSequence[0].ReferencedSOPInstanceUID == f"1.2.3.4.5.{top['slice_index'] + 1}"
    assert key.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and key.BurnedInAnnotation == "YES"
    assert key.pixel_array.shape == (96, 96, 3)


def test_identifiers_are_copied_into_the_objects_and_nowhere_else(flagged: StudyResult) -> None:
    for obj in flagged.objects:
        assert (obj.PatientID, str(obj.PatientName), obj.StudyInstanceUID) == (PATIENT, NAME, STUDY)
        new = [obj.SOPInstanceUID, obj.SeriesInstanceUID]
        assert all(uid.startswith(PACS.uid_root) for uid in new) and len(set(new)) == 2
    report = json.dumps(flagged.report)
    assert not any(secret in report for secret in (PATIENT, "DOE", STUDY, "1.2.3.4.5"))


def test_the_objects_pass_dciodvfy(flagged: StudyResult, tmp_path: Path) -> None:
    for n, obj in enumerate(flagged.objects):
        obj.save_as(tmp_path / f"{n}.dcm", enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / f"{n}.dcm") == []


def test_an_unflagged_study_gets_an_sr_and_no_key_image(study: Path, tmp_path: Path) -> None:
    result = triage_folder(study, tiny_triage(tmp_path, 1.01), model="m", version="1", ingest=INGEST, config=PACS)
    assert len(result.objects) == 1 and finding(result.objects[0]) == "No finding"
    assert len(set(referenced_sops(result.objects[0]))) == 1  # the most suspicious slice, for the reader


def test_slices_map_to_source_files_in_ingest_order(tmp_path: Path) -> None:
    """z order whatever the instance numbers and file names; a duplicate position and a non-DICOM
    file are left out as ingest leaves them out."""
    paths = write_series(tmp_path, 5, size=96, name="{:04d}-x.dcm")
    paths.append(write(ct_slice(sop="9.9", z=2.0, instance=99, size=96), tmp_path / "dup.dcm"))
    (tmp_path / "notes.txt").write_text("not DICOM")
    order = ordered_slices([*paths[::-1], tmp_path / "notes.txt"], INGEST)
    assert [s.header.SOPInstanceUID for s in order] == [f"1.2.3.4.5.{i}" for i in range(1, 6)]


def test_a_study_without_ct_is_a_clear_error(tmp_path: Path) -> None:
    write(ct_slice(modality="MR", size=96), tmp_path / "mr.dcm")
    with pytest.raises(PacsError, match="no CT series"):
        triage_folder(tmp_path, Triage.__new__(Triage), model="m", version="1", ingest=INGEST, config=PACS)


def test_a_lossy_study_is_refused_with_the_reason(flagging: Triage, real_ct: Path, tmp_path: Path) -> None:
    name = "CTImage.dcm_JPEGProcess1TransferSyntax_1.2.840.10008.1.2.4.50.dcm"
    shutil.copy(real_ct / "transfer-syntaxes" / name, tmp_path / "lossy.dcm")
    with pytest.raises(PacsError, match="lossy_compression"):
        triage_folder(tmp_path, flagging, model="m", version="1", ingest=INGEST, config=PACS)


def test_two_studies_in_one_folder_are_refused(flagging: Triage, tmp_path: Path) -> None:
    write_series(tmp_path / "a", 2, size=96, study="1.1")
    write_series(tmp_path / "b", 2, size=96, study="2.2", series="2.2.1")
    with pytest.raises(PacsError, match="2 studies"):
        triage_folder(tmp_path, flagging, model="m", version="1", ingest=INGEST, config=PACS)


def test_real_lidc_slices_give_valid_objects(flagging: Triage, real_ct: Path, tmp_path: Path) -> None:
    for path in sorted((real_ct / "lidc-idri-0002").glob("*.dcm"))[100:108]:
        shutil.copy(path, tmp_path / path.name)
    result = triage_folder(tmp_path, flagging, model="pe-triage", version="2", ingest=INGEST, config=PACS)
    sources = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in tmp_path.glob("*.dcm")}
    assert set(referenced_sops(result.objects[0])) == sources
    for n, obj in enumerate(result.objects):
        obj.save_as(tmp_path / f"result-{n}.dcm", enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / f"result-{n}.dcm") == []


@pytest.mark.parametrize("root", ["1.2.3", "1.2.x.", "1." + "2" * 45 + "."])
def test_a_bad_uid_root_is_refused(root: str) -> None:
    with pytest.raises(ConfigError, match="uid_root"):
        PacsConfig(uid_root=root)
