"""The hospital's label manifest: parsed, checked, and pseudonymised before it meets any slice.

Joining on pseudonyms (the manifest's clear ids go through the same keyed hash as the DICOM
headers) lets labels be re-joined to slices ingested in earlier runs, whose clear ids are gone.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from io import StringIO

from pe_triage.dicom.deid import Pseudonymizer
from pe_triage.schema import (
    M_DIAGNOSIS,
    M_INSTANCE_NUMBER,
    M_LABEL,
    M_PATIENT_ID,
    M_SERIES_UID,
    M_SOP_UID,
    M_STUDY_UID,
    MANIFEST_COLUMNS,
    Label,
)

#: slice labels a manifest lists (unlisted slices of a listed patient are WNL)
_LABELS = {Label.PE.value, Label.OTHER.value, Label.INDETERMINATE.value}
#: patient diagnoses: the patient's class (schema.patient_class); an indeterminate exam (RSPECT has
#: them) is one whose only finding is indeterminate, and is left out of patient metrics
_DIAGNOSES = {label.value for label in Label}


class ManifestError(ValueError):
    """The manifest cannot be used; the message names the rows (1-based, header = row 1)."""


@dataclass(frozen=True)
class LabelRow:
    row: int  # line number in the CSV
    label: str | None  # slice rows
    diagnosis: str | None  # patient rows
    patient: str


@dataclass
class Manifest:
    """Pseudonymised label manifest of one site. Rows are matched as slices are labelled."""

    patients: set[str] = field(default_factory=set)
    diagnosis: dict[str, LabelRow] = field(default_factory=dict)
    by_sop: dict[str, LabelRow] = field(default_factory=dict)
    by_instance: dict[tuple[str, int], LabelRow] = field(default_factory=dict)

    def label(self, patient: str, study: str, series: str, sop: str, instance: int | None) -> tuple[str | None, int | None]:
        """(label, manifest row) of one slice: the listed label, WNL for unlisted slices of a listed
        patient, None for patients the manifest does not know."""
        if patient not in self.patients:
            return None, None
        row = self.by_sop.get(sop)
        if row is None and instance is not None:
            row = self.by_instance.get((series, instance)) or self.by_instance.get((study, instance))
        if row is None:
            return Label.WNL.value, None
        return row.label, row.row

    def all_rows(self) -> list[LabelRow]:
        rows = [*self.diagnosis.values(), *self.by_sop.values(), *self.by_instance.values()]
        return sorted(rows, key=lambda r: r.row)


def _clean(value: object) -> str:
    return str(value).strip() if value is not None else ""


def load_manifest(text: str, pseudo: Pseudonymizer) -> Manifest:
    """Parse a manifest CSV (see ``schema.MANIFEST_COLUMNS``); every problem is reported at once."""
    reader = csv.DictReader(StringIO(text))
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    unknown = sorted(set(columns) - set(MANIFEST_COLUMNS))
    if M_PATIENT_ID not in columns:
        raise ManifestError(f"label manifest has no '{M_PATIENT_ID}' column; expected columns {MANIFEST_COLUMNS}")
    if unknown:
        raise ManifestError(f"label manifest has unknown column(s) {unknown}; expected {MANIFEST_COLUMNS}")
    reader.fieldnames = columns
    manifest = Manifest()
    errors: list[str] = []
    for i, rec in enumerate(reader, start=2):
        values = {k: _clean(rec.get(k)) for k in MANIFEST_COLUMNS}
        patient = values[M_PATIENT_ID]
        label, diagnosis = values[M_LABEL].lower(), values[M_DIAGNOSIS].lower()
        if not patient:
            errors.append(f"row {i}: empty {M_PATIENT_ID}")
            continue
        p_patient = pseudo("patient", patient)
        manifest.patients.add(p_patient)
        if diagnosis:
            if diagnosis not in _DIAGNOSES:
                errors.append(f"row {i}: diagnosis '{diagnosis}' is not one of {sorted(_DIAGNOSES)}")
            elif p_patient in manifest.diagnosis:
                errors.append(f"row {i}: second diagnosis for a patient (first on row {manifest.diagnosis[p_patient].row})")
            else:
                manifest.diagnosis[p_patient] = LabelRow(i, None, diagnosis, p_patient)
        if not label:
            if not diagnosis:
                errors.append(f"row {i}: neither {M_LABEL} nor {M_DIAGNOSIS}")
            continue
        if label not in _LABELS:
            errors.append(f"row {i}: label '{label}' is not one of {sorted(_LABELS)} (unlisted slices are wnl)")
            continue
        row = LabelRow(i, label, None, p_patient)
        if values[M_SOP_UID]:
            key: object = pseudo("sop", values[M_SOP_UID])
            table: dict = manifest.by_sop
        elif values[M_INSTANCE_NUMBER] and (values[M_SERIES_UID] or values[M_STUDY_UID]):
            try:
                number = int(float(values[M_INSTANCE_NUMBER]))
            except ValueError:
                errors.append(f"row {i}: {M_INSTANCE_NUMBER} is not a number")
                continue
            scope = pseudo("series", values[M_SERIES_UID]) if values[M_SERIES_UID] else pseudo("study", values[M_STUDY_UID])
            key, table = (scope, number), manifest.by_instance
        else:
            errors.append(f"row {i}: a slice label needs {M_SOP_UID}, or {M_INSTANCE_NUMBER} with {M_SERIES_UID} "
                          f"or {M_STUDY_UID}")
            continue
        if key in table:
            errors.append(f"row {i}: the same slice is labelled again (first on row {table[key].row})")
            continue
        table[key] = row
    if errors:
        raise ManifestError("label manifest is invalid:\n  " + "\n  ".join(errors[:50]))
    return manifest
