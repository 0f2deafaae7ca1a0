"""Public datasets' label files -> the project's label manifest (``pe-triage labels convert``).

Formats: ``rspect`` (RSNA-STR PE CT train.csv), ``lidc`` (LIDC-IDRI reading XML), ``masks`` (PE mask
volumes: DICOM SEG, or .npy with a JSON sidecar) and ``manifest`` (an existing manifest, checked and
normalised). The result is checked by ingest's own parser (:func:`pe_triage.labels.load_manifest`)
before it is written, so ingest takes it unchanged; what did not map is counted by reason in the
report, which names input and row numbers only, never an identifier.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from pe_triage.config import LabelsConfig
from pe_triage.dicom.deid import Pseudonymizer
from pe_triage.ingest.adapters import lidc, masks, rspect
from pe_triage.ingest.adapters.common import LabelConvertError, input_files, read_uri
from pe_triage.labels import load_manifest
from pe_triage.schema import M_DIAGNOSIS, M_LABEL, MANIFEST_COLUMNS
from pe_triage.storage import atomic_path, location

FORMATS = ("rspect", "lidc", "masks", "manifest")

__all__ = ["FORMATS", "LabelConvertError", "convert_labels", "site_manifest"]


def convert_labels(fmt: str, inputs: list[str], out: str, config: LabelsConfig | None = None,
                   patient_id: str | None = None, report: str | None = None) -> dict[str, Any]:
    """Convert ``inputs`` (files or folders, local or s3://) to the manifest ``out``; the report
    (also written to ``report`` when given). ``patient_id`` names the patient of LIDC XMLs outside
    a ``LIDC-IDRI-NNNN`` folder."""
    config = config or LabelsConfig()
    if fmt not in FORMATS:
        raise LabelConvertError(f"label format {fmt!r}: expected one of {FORMATS}")
    if not inputs:
        raise LabelConvertError("no label input given")
    if fmt == "manifest":
        text, result = _normalised(inputs)
    else:
        conv, files = (lidc.convert(inputs, config, patient_id) if fmt == "lidc" else
                       rspect.convert(inputs, config) if fmt == "rspect" else masks.convert(inputs, config))
        if not files:
            raise LabelConvertError(f"no {fmt} label file found in the input(s)")
        text, result = _csv(conv.rows()), conv.report(fmt, files)
    manifest = load_manifest(text, Pseudonymizer(os.urandom(32), "check"))  # ingest's own checks, any key
    result["manifest_rows"] = len(manifest.all_rows())
    _write(out, text.encode())
    if report:
        _write(report, json.dumps(result, indent=2).encode())
    return result


def site_manifest(labels: str, fmt: str, config: LabelsConfig | None = None) -> str:
    """The manifest ingest reads for a site's label input: the input itself for a manifest (or none),
    else the converted one, written beside the input (``<input>.manifest.csv``, with its
    ``.report.json``) since it holds the same identifiers as the label files it comes from."""
    if not labels or fmt == "manifest":
        return labels
    out = labels.rstrip("/") + ".manifest.csv"
    convert_labels(fmt, [labels], out, config, report=labels.rstrip("/") + ".report.json")
    return out


def _normalised(inputs: list[str]) -> tuple[str, dict[str, Any]]:
    """An existing manifest: columns in the documented order, cells stripped, labels lower case."""
    files = list(input_files(inputs, (".csv",)))
    if len(files) != 1:
        raise LabelConvertError(f"--format manifest takes one manifest file, got {len(files)}")
    text = read_uri(files[0]).decode("utf-8-sig")
    load_manifest(text, Pseudonymizer(os.urandom(32), "check"))  # its errors name the input's rows
    reader = csv.DictReader(io.StringIO(text))
    reader.fieldnames = [c.strip().lower() for c in reader.fieldnames or []]
    rows = [{k: (v or "").strip() for k, v in rec.items() if k in MANIFEST_COLUMNS} for rec in reader]
    for rec in rows:
        for key in (M_LABEL, M_DIAGNOSIS):
            if rec.get(key):
                rec[key] = rec[key].lower()
    return _csv(rows), {"format": "manifest", "inputs": 1, "rows": len(rows), "excluded": {}, "problems": [],
                        "problems_total": 0}


def _csv(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write(uri: str, data: bytes) -> None:
    """Atomically: a local file by rename, an S3 object by its single PUT."""
    loc = location(uri)
    if uri.startswith("s3://"):
        loc.write_bytes(loc.root, data)
        return
    with atomic_path(Path(loc.root)) as tmp:
        tmp.write_bytes(data)


