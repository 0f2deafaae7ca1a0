"""The monitoring store: one de-identified record per triaged study, as Parquet under
``day=YYYY-MM-DD/`` on a folder or ``s3://`` prefix.

A write is a new file with a unique name (time + random), never a read-modify-write, so any number
of servers, listeners and command lines append at once without clashing. A record holds the site
label (configuration, never a DICOM field), the model and version, the acquisition fields ingest
keeps, the input's HU histogram summary, score summaries and quarantine counts: no UID, patient
field, path, file name or pixel.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pe_triage import schema as S
from pe_triage.config import MonitorConfig
from pe_triage.predict import TRIAGE, Triage, triage_report
from pe_triage.storage import location

log = logging.getLogger(__name__)

#: acquisition fields of a record: what ingest keeps per slice (the input's most common value)
ACQUISITION = (S.MANUFACTURER, S.KERNEL, S.KVP, S.PIXEL_SPACING_ROW, S.SLICE_THICKNESS)
QUANTILES = (0.5, 0.9, 0.99)
HU_MEDIAN, HU_FRACTIONS = "hu_median", "hu_fractions"
_SCORES = (S.P_DISEASE, S.P_PE)
RECORD_SCHEMA = pa.schema([
    pa.field("time", pa.timestamp("ms", tz="UTC")), pa.field("site", pa.string()), pa.field("source", pa.string()),
    pa.field("model", pa.string()), pa.field("model_version", pa.string()),
    pa.field(S.MANUFACTURER, pa.string()), pa.field(S.KERNEL, pa.string()), pa.field(S.KVP, pa.float64()),
    pa.field(S.PIXEL_SPACING_ROW, pa.float64()), pa.field(S.SLICE_THICKNESS, pa.float64()),
    # the input's HU inside the lung crop (``pe_triage.hu_summary``): soft-tissue median, fractions per 100-HU bin
    pa.field(HU_MEDIAN, pa.float64()), pa.field(HU_FRACTIONS, pa.list_(pa.float64())),
    pa.field("n_slices", pa.int32()), pa.field("n_scored", pa.int32()), pa.field("flagged_slices", pa.int32()),
    pa.field("study_triage", pa.string()),
    *[pa.field(f"{s}_{k}", pa.float64()) for s in _SCORES for k in ("max", "mean", *(f"q{int(q * 100)}" for q in QUANTILES))],
    pa.field("quarantine", pa.string()),  # JSON {reason: count}: reasons are ingest's fixed vocabulary
    # the exam model's per-study probabilities; null for a version without one
    pa.field("exam_p_disease", pa.float64()), pa.field("exam_p_pe", pa.float64()),
])
RECORD_COLUMNS = tuple(RECORD_SCHEMA.names)

_failures = 0
_lock = threading.Lock()


def write_failures() -> int:
    """Records this process could not write (each one logged): a gauge for an operator."""
    return _failures


def _plain(value: Any) -> Any:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _scores(values: np.ndarray, name: str) -> dict[str, float | None]:
    v = values[np.isfinite(values)]
    stats = {"max": v.max(), "mean": v.mean(), **{f"q{int(q * 100)}": np.quantile(v, q) for q in QUANTILES}} if v.size else {}
    return {f"{name}_{k}": (float(stats[k]) if k in stats else None)
            for k in ("max", "mean", *(f"q{int(q * 100)}" for q in QUANTILES))}


def _study(study: dict[str, Any]) -> dict[str, Any]:
    slices = [s for series in study["series"] for s in series["slices"] if s[TRIAGE] != "skipped"]
    scores = {n: np.array([np.nan if s[n] is None else s[n] for s in slices], float) for n in _SCORES}
    exam = study.get("exam") or {}
    return {"n_slices": int(study["slices"]), "n_scored": len(slices), "flagged_slices": len(study["flagged_slices"]),
            "study_triage": str(study["triage"]), **{k: v for n in _SCORES for k, v in _scores(scores[n], n).items()},
            "exam_p_disease": exam.get(S.P_DISEASE), "exam_p_pe": exam.get(S.P_PE)}


def _model_name(report: dict[str, Any]) -> str:
    """The registered model's name or URI; "local" for a model folder (its path is not recorded)."""
    name = str(report.get("model_name") or report.get("model") or "")
    return name if name and "/" not in name or name.startswith("models:/") else "local"


def study_records(report: dict[str, Any], *, site: str, source: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """One record per study of a triage report (:func:`pe_triage.predict.triage_report`, as predict,
    serve and listen answer). The acquisition fields and quarantine counts are the call's input's
    (one study per call in practice). Only named fields are copied: nothing else of the report."""
    now = now or datetime.now(UTC)
    summary = report.get("input", {})
    acquisition = summary.get("acquisition", {})
    version = report.get("model_version")
    common = {"time": now, "site": site, "source": source, "model": _model_name(report),
              "model_version": None if version is None else str(version),
              **{f: _plain(acquisition.get(f)) for f in ACQUISITION},
              HU_MEDIAN: summary.get("hu", {}).get("median"), HU_FRACTIONS: summary.get("hu", {}).get("fractions"),
              "quarantine": json.dumps({str(k): int(v) for k, v in summary.get("quarantine_reasons", {}).items()},
                                       sort_keys=True)}
    return [{**common, **_study(study)} for study in report["studies"]]


class MonitorStore:
    """Append records (a new file per call) and read them back by day."""

    def __init__(self, uri: str) -> None:
        self.loc = location(uri)

    def append(self, records: Sequence[dict[str, Any]]) -> str | None:
        """Write ``records`` as one new file in the partition of the first one's day; its path."""
        if not records:
            return None
        table = pa.Table.from_pylist(list(records), schema=RECORD_SCHEMA)
        day = records[0]["time"].astimezone(UTC).date().isoformat()
        name = f"part-{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex}.parquet"
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        path = self.loc.join(f"day={day}", name)
        if isinstance(self.loc.fs, pafs.LocalFileSystem):  # a local reader never sees half a file
            hidden = self.loc.join(f"day={day}", f".{name}.tmp")
            self.loc.write_bytes(hidden, buffer.getvalue())
            self.loc.replace(hidden, path)
        else:  # an S3 PUT is atomic
            self.loc.write_bytes(path, buffer.getvalue())
        return path

    def read(self, since: date | None = None, until: date | None = None) -> pd.DataFrame:
        """Every record of the days ``since``..``until`` (inclusive; None: open)."""
        frames = []
        if self.loc.exists(self.loc.root):
            for rel, _ in self.loc.list_files():
                part, _, name = rel.partition("/")
                if not part.startswith("day=") or name.startswith(".") or not name.endswith(".parquet"):
                    continue
                day = date.fromisoformat(part[4:])
                if (since is None or day >= since) and (until is None or day <= until):
                    frames.append(pq.read_table(self.loc.join(rel), filesystem=self.loc.fs).to_pandas())
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in RECORD_COLUMNS})
        return pd.concat(frames, ignore_index=True)


def _append(config: MonitorConfig, build: Callable[[], list[dict[str, Any]]]) -> None:
    """Build and append records when a store is configured. Never raises: a monitoring outage must not
    fail a triage; a failure is logged (its kind only: no record content) and counted (:func:`write_failures`)."""
    global _failures
    if not config.store:
        return
    try:
        MonitorStore(config.store).append(build())
    except Exception as e:  # noqa: BLE001 - any failure of the store is reported, never raised into the triage
        with _lock:
            _failures += 1
        log.warning("monitoring record not written (%s; %d failure(s) so far)", type(e).__name__, _failures)


def record_triage(config: MonitorConfig, report: dict[str, Any], *, source: str) -> None:
    """Append the records of one triage report (predict, ``/v1/triage``, listen)."""
    _append(config, lambda: study_records(report, site=config.site, source=source))


def record_frame(config: MonitorConfig, frame: pd.DataFrame, triage: Triage, *, model: str, version: str | int | None,
                 source: str) -> None:
    """Append the records of a per-slice frame (``/invocations``: HU slices, so no acquisition fields)."""
    _append(config, lambda: study_records({**triage_report(frame, triage, model=model), "model_version": version},
                                          site=config.site, source=source))
