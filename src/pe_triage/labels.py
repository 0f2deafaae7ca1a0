"""The hospital's label manifest: parsed, checked, and pseudonymised before it meets any slice.

Joining on pseudonyms (the manifest's clear ids go through the same keyed hash as the DICOM
headers) lets labels be re-joined to slices ingested in earlier runs, whose clear ids are gone.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from io import StringIO
from typing import Any

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
#: problems a manifest error lists (the rest are counted): enough to fix a batch, short enough to log
_SHOWN = 50


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
    """Parse a manifest CSV (see ``schema.MANIFEST_COLUMNS``); every problem is reported at once, on
    one line, by row number and column: cell values can be PHI (a shifted column puts a name where a
    label belongs), so no message repeats one."""
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
    try:
        for i, rec in enumerate(reader, start=2):
            errors += _add_row(manifest, i, {k: _clean(rec.get(k)) for k in MANIFEST_COLUMNS}, pseudo)
    except csv.Error as e:  # its messages name limits, never the cell
        raise ManifestError(f"label manifest: not readable as CSV after line {reader.line_num} ({e})") from None
    if errors:
        more = f"; and {len(errors) - _SHOWN} more" if len(errors) > _SHOWN else ""
        raise ManifestError(f"label manifest is invalid ({len(errors)} problem(s)): {'; '.join(errors[:_SHOWN])}{more}")
    return manifest


def _add_row(manifest: Manifest, i: int, values: dict[str, str], pseudo: Pseudonymizer) -> list[str]:
    """Add row ``i`` to ``manifest``; what is wrong with it, by row and column (a bad diagnosis does
    not stop the row's label being checked)."""
    patient = values[M_PATIENT_ID]
    label, diagnosis = values[M_LABEL].lower(), values[M_DIAGNOSIS].lower()
    if not patient:
        return [f"row {i}: empty {M_PATIENT_ID}"]
    p_patient = pseudo("patient", patient)
    manifest.patients.add(p_patient)
    problems: list[str] = []
    if diagnosis not in _DIAGNOSES | {""}:
        problems.append(f"row {i}, column {M_DIAGNOSIS}: not one of {sorted(_DIAGNOSES)}")
    elif diagnosis and p_patient in manifest.diagnosis:
        problems.append(f"row {i}: second diagnosis for a patient (first on row {manifest.diagnosis[p_patient].row})")
    elif diagnosis:
        manifest.diagnosis[p_patient] = LabelRow(i, None, diagnosis, p_patient)
    if not label:
        return problems if diagnosis else [f"row {i}: neither {M_LABEL} nor {M_DIAGNOSIS}"]
    return problems + _add_label(manifest, i, values, label, p_patient, pseudo)


def _add_label(manifest: Manifest, i: int, values: dict[str, str], label: str, p_patient: str,
               pseudo: Pseudonymizer) -> list[str]:
    """File row ``i``'s slice label by SOP UID or by instance number; what is wrong with it."""
    if label not in _LABELS:
        return [f"row {i}, column {M_LABEL}: not one of {sorted(_LABELS)} (unlisted slices are wnl)"]
    key: Any
    table: dict[Any, LabelRow]
    if values[M_SOP_UID]:
        key, table = pseudo("sop", values[M_SOP_UID]), manifest.by_sop
    elif values[M_INSTANCE_NUMBER] and (values[M_SERIES_UID] or values[M_STUDY_UID]):
        try:
            number = int(float(values[M_INSTANCE_NUMBER]))
        except ValueError:
            return [f"row {i}, column {M_INSTANCE_NUMBER}: not a number"]
        scope = pseudo("series", values[M_SERIES_UID]) if values[M_SERIES_UID] else pseudo("study", values[M_STUDY_UID])
        key, table = (scope, number), manifest.by_instance
    else:
        return [f"row {i}: a slice label needs {M_SOP_UID}, or {M_INSTANCE_NUMBER} with {M_SERIES_UID} or {M_STUDY_UID}"]
    if key in table:
        return [f"row {i}: the same slice is labelled again (first on row {table[key].row})"]
    table[key] = LabelRow(i, label, None, p_patient)
    return []
