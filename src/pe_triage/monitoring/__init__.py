"""Prediction monitoring: a de-identified record per triaged study (:mod:`.store`) and the drift
report of ``pe-triage monitor`` (:mod:`.drift`)."""

from pe_triage.monitoring.store import (
    RECORD_COLUMNS,
    MonitorStore,
    record_frame,
    record_triage,
    study_records,
    write_failures,
)

__all__ = ["RECORD_COLUMNS", "MonitorStore", "record_frame", "record_triage", "study_records", "write_failures"]
