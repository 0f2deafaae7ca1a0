"""What every label adapter shares: the manifest rows it builds and the report of what did not map.

A report holds counts and input/row numbers only: the inputs' identifiers (UIDs, patient ids, file
names) never reach it or a log line, so it can be shared like ingest's report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pyarrow.fs import FileType

from pe_triage.schema import (
    M_DIAGNOSIS,
    M_LABEL,
    M_PATIENT_ID,
    M_SERIES_UID,
    M_SOP_UID,
    M_STUDY_UID,
    Label,
    patient_class,
)
from pe_triage.storage import location

#: problems a report lists one by one (the rest are counted): enough to fix a batch, short enough to read
SHOWN = 50


class LabelConvertError(ValueError):
    """An input cannot be converted at all (wrong format, missing columns); the message names no value."""


@dataclass
class Conversion:
    """Slice labels per patient as they are found, and the counts the report is made of."""

    #: patient -> sop -> (label, study, series); a SOP labelled twice keeps the higher-ranked label
    slices: dict[str, dict[str, tuple[str, str, str]]] = field(default_factory=dict)
    #: patient -> study of its diagnosis row; patients listed with no slice label are WNL
    patients: dict[str, str] = field(default_factory=dict)
    excluded: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[dict[str, Any]] = field(default_factory=list)
    problems_total: int = 0
    notes: list[str] = field(default_factory=list)

    def problem(self, reason: str, input_no: int, row: int | None = None) -> None:
        """One thing that did not map: input number (1-based), row (1-based, header = 1) and reason."""
        self.problems_total += 1
        self.excluded[reason] += 1
        if len(self.problems) < SHOWN:
            self.problems.append({"input": input_no, **({"row": row} if row is not None else {}), "reason": reason})

    def patient(self, patient: str, study: str) -> None:
        self.patients.setdefault(patient, study)

    def label(self, patient: str, study: str, series: str, sop: str, label: str) -> None:
        """Label one slice; a finding outranks an indeterminate mark of the same slice."""
        self.patient(patient, study)
        slices = self.slices.setdefault(patient, {})
        old = slices.get(sop)
        if old is None or patient_class([old[0], label]) == label:
            slices[sop] = (label, study, series)

    def rows(self) -> list[dict[str, str]]:
        """Manifest rows: per patient one diagnosis row (the class its slices give), then its slices."""
        out: list[dict[str, str]] = []
        for patient, study in self.patients.items():
            slices = self.slices.get(patient, {})
            out.append({M_PATIENT_ID: patient, M_STUDY_UID: study,
                        M_DIAGNOSIS: patient_class(v[0] for v in slices.values())})
            out += [{M_PATIENT_ID: patient, M_STUDY_UID: st, M_SERIES_UID: se, M_SOP_UID: sop, M_LABEL: lab}
                    for sop, (lab, st, se) in slices.items()]
        return out

    def report(self, fmt: str, inputs: int) -> dict[str, Any]:
        labels = Counter(lab for s in self.slices.values() for lab, _, _ in s.values())
        diagnoses = Counter(patient_class(v[0] for v in self.slices.get(p, {}).values()) for p in self.patients)
        return {
            "format": fmt,
            "inputs": inputs,
            "patients": len(self.patients),
            "diagnoses": dict(sorted(diagnoses.items())),
            "slice_labels": {lab.value: labels.get(lab.value, 0) for lab in Label if lab != Label.WNL},
            "counts": dict(sorted(self.counts.items())),
            "excluded": dict(sorted(self.excluded.items())),
            "problems": self.problems,
            "problems_total": self.problems_total,
            "notes": self.notes,
        }


def read_uri(uri: str) -> bytes:
    loc = location(uri)
    return loc.read(loc.root)


def input_files(uris: list[str], suffixes: tuple[str, ...]) -> Iterator[str]:
    """Every input file: a file as given, a folder (or S3 prefix) as its files ending in ``suffixes``,
    sorted. A missing input is an error: a typo must not read as "nothing to convert"."""
    for n, uri in enumerate(uris, start=1):
        loc = location(uri)
        kind = loc.fs.get_file_info(loc.root).type
        if kind == FileType.NotFound:
            raise LabelConvertError(f"label input {n}: no such file or folder")
        if kind == FileType.File:
            yield uri
            continue
        for rel, _ in loc.list_files():
            if rel.lower().endswith(suffixes) and not rel.rsplit("/", 1)[-1].startswith("."):
                yield f"{uri.rstrip('/')}/{rel}"
