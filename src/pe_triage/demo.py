"""The main job on the embedded default: generate a synthetic cohort, onboard every site,
preprocess and split it.

Later steps (train, evaluate, register) join here as they are built; each step is the same
library call the pipeline components make.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pe_triage.config import Config
from pe_triage.dicom import DEMO_KEY, Pseudonymizer
from pe_triage.ingest import ingest_site
from pe_triage.preprocess import preprocess
from pe_triage.splits import split_dataset
from pe_triage.synth import CohortSummary, generate_cohort

log = logging.getLogger(__name__)


def cohort_overview(cohort: CohortSummary) -> dict[str, Any]:
    """Counts only: the summary's file list and injected PHI strings stay out of logs and reports."""
    return {
        "sites": {s.name: {"patients": s.patients, "slices": s.slices} for s in cohort.sites},
        "patients_per_class": dict(cohort.class_counts),
    }


def run_demo(out: Path, config: Config) -> dict[str, Any]:
    """Writes ``out/cohort`` (DICOM + manifests + ground truth), ``out/slices``, ``out/windows`` and
    ``out/splits.parquet``; returns a summary."""
    cohort = generate_cohort(out / "cohort", config.synth)
    sites = sorted(p.name for p in (out / "cohort" / "sites").iterdir() if p.is_dir())
    reports = {}
    for site in sites:
        folder = out / "cohort" / "sites" / site
        log.info("ingesting %s", site)
        reports[site] = ingest_site(
            site,
            str(folder / "dicom"),
            str(out / "slices"),
            pseudo=Pseudonymizer(DEMO_KEY, site),  # synthetic data: the public demo key is fine
            labels=str(folder / "labels.csv"),
            config=config.ingest,
        )
    windows = preprocess(str(out / "slices"), str(out / "windows"), config=config.preprocess)
    splits = split_dataset(str(out / "windows"), str(out / "splits.parquet"), config=config.split)
    summary = {
        "cohort": cohort_overview(cohort),
        "ingest": {s: {k: r[k] for k in ("files", "quarantine_reasons", "dataset", "timing")} for s, r in reports.items()},
        "preprocess": {k: windows[k] for k in ("series", "slices_written", "labels_written", "timing")},
        "splits": splits["folds"],
        "outputs": {name: str(out / name) for name in ("cohort", "slices", "windows", "splits.parquet")},
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
