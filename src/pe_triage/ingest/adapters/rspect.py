"""RSNA-STR Pulmonary Embolism CT (RSPECT, Kaggle 2020) ``train.csv`` -> label manifest.

One row per image: three UIDs, the image label ``pe_present_on_image`` and twelve exam-level 0/1
flags repeated on every image of the exam. RSPECT names no patient: the StudyInstanceUID stands for
the patient (one exam each), so ingest must see that UID as the DICOM PatientID of those files.

"Other disease" is not represented: RSPECT labels PE only, so an exam without PE is written as WNL
(its slices unlisted) although it may hold any other finding. Stage 1 trained on RSPECT alone learns
PE vs no PE, and stage 2 (PE vs other disease) has no "other" class here: its negatives must come from
another set (e.g. LIDC-IDRI converted with ``--format lidc``, onboarded as another site). The
location/chronicity/RV-LV flags have no manifest column; the report counts them over the kept exams.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field

from pe_triage.config import LabelsConfig
from pe_triage.ingest.adapters.common import Conversion, LabelConvertError, input_files, read_uri
from pe_triage.schema import Label

IDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
IMAGE = "pe_present_on_image"
#: exam-level flags, in the dataset's column order
EXAM = ("negative_exam_for_pe", "qa_motion", "qa_contrast", "flow_artifact", "rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1",
        "leftsided_pe", "chronic_pe", "true_filling_defect_not_pe", "rightsided_pe", "acute_and_chronic_pe",
        "central_pe", "indeterminate")
COLUMNS = (*IDS, IMAGE, *EXAM)


@dataclass
class _Exam:
    first_row: int
    flags: tuple[int, ...]
    images: int = 0
    #: (series, sop) of its PE images
    pe: dict[str, str] = field(default_factory=dict)
    #: (series, sop) of its other images, kept for indeterminate exams only (the rest stay unlisted)
    other: dict[str, str] = field(default_factory=dict)
    bad: bool = False


def convert(uris: list[str], config: LabelsConfig) -> tuple[Conversion, int]:
    """Every train.csv given (several are read as one table): rows checked one by one, then exams."""
    conv = Conversion()
    exams: dict[str, _Exam] = {}
    files = list(input_files(uris, (".csv",)))
    for n, uri in enumerate(files, start=1):
        for row, rec in _rows(read_uri(uri), n):
            _add_row(conv, exams, n, row, rec)
    for study, exam in exams.items():
        _add_exam(conv, study, exam, config)
    conv.notes.append("patient_id is the StudyInstanceUID (RSPECT has no patient id); exams without PE are wnl "
                      "although RSPECT does not label other disease: not usable for stage 2 alone")
    return conv, len(files)


def _rows(data: bytes, n: int) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise LabelConvertError(f"label input {n}: not an RSPECT train.csv, missing column(s) {missing}")
    try:
        yield from enumerate(reader, start=2)
    except csv.Error as e:
        raise LabelConvertError(f"label input {n}: not readable as CSV after line {reader.line_num} ({e})") from None


def _add_row(conv: Conversion, exams: dict[str, _Exam], n: int, i: int, rec: dict[str, str]) -> None:
    """File row ``i`` under its exam; a malformed row is reported and spoils its exam (an unread PE
    image must not leave the exam's other slices WNL)."""
    conv.counts["rows"] += 1
    study, series, sop = (str(rec.get(c) or "").strip() for c in IDS)
    values = [str(rec.get(c) or "").strip() for c in (IMAGE, *EXAM)]
    if not study:
        conv.problem("row_without_study_uid", n, i)
        return
    exam = exams.get(study)
    if not (series and sop) or any(v not in ("0", "1") for v in values):
        conv.problem("row_with_missing_uid" if not (series and sop) else "row_with_value_not_0_or_1", n, i)
        if exam is None:
            exams[study] = _Exam(i, (), bad=True)
        else:
            exam.bad = True
        return
    flags = tuple(int(v) for v in values[1:])
    if exam is None:
        exam = exams[study] = _Exam(i, flags)
    elif exam.flags and exam.flags != flags:
        conv.problem("row_whose_exam_flags_differ_from_its_exam", n, i)
        exam.bad = True
    exam.flags = exam.flags or flags
    exam.images += 1
    if values[0] == "1":
        if sop in exam.pe:
            conv.problem("row_repeating_an_image", n, i)
            exam.bad = True
        exam.pe[sop] = series
    elif flags[EXAM.index("indeterminate")]:
        exam.other[sop] = series


def _add_exam(conv: Conversion, study: str, exam: _Exam, config: LabelsConfig) -> None:
    """Keep or exclude one exam (counted by reason); a kept one becomes a patient with its PE slices."""
    flag = dict(zip(EXAM, exam.flags, strict=True)) if exam.flags else {}
    reason = ("exam_with_malformed_rows" if exam.bad or not flag
              else "exam_indeterminate" if flag["indeterminate"] and config.exclude_indeterminate
              else "exam_failing_qa" if (flag["qa_motion"] or flag["qa_contrast"]) and config.exclude_qa_failed
              else "exam_negative_with_pe_images" if flag["negative_exam_for_pe"] and exam.pe
              else "exam_positive_without_pe_images" if not (flag["negative_exam_for_pe"] or flag["indeterminate"]
                                                             or exam.pe)
              else None)
    if reason:
        conv.excluded[reason] += 1
        conv.counts["exams_excluded"] += 1
        return
    conv.counts["exams_kept"] += 1
    conv.counts.update(f"exams_with_{k}" for k, v in flag.items() if v)
    conv.patient(study, study)
    for sop, series in exam.pe.items():
        conv.label(study, study, series, sop, Label.PE.value)
    for sop, series in exam.other.items():  # an indeterminate exam kept: its non-PE images are indeterminate
        conv.label(study, study, series, sop, Label.INDETERMINATE.value)
