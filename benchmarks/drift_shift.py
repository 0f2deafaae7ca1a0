"""The drift report on a synthetic cohort with a shifted site (issue 23's must-show): does
``pe-triage monitor`` flag a site whose scanner changed convention, with the numbers, and leave the
calibrated sites alone?

    python benchmarks/drift_shift.py [--patients 25 --slices 12 --size 96] [--hu-offset 100]
        [--noise-scale 2.5 --kernel B70f] [--work DIR] [--out FILE]

The training data: a three-site cohort (seed 1) ingested into a slices store, the reference the
report builds (acquisition fields and the HU summary of the lung crop). Production: a new cohort
(seed 2) of the same three sites plus a fourth, ``site-d``, shifted with ``synth.site_shift`` (a
sharper kernel under another name, more noise, an HU offset); every study goes through
``Triage.score_dicom`` (random tiny models: the input summary does not depend on the weights) and
becomes one monitoring record, as ``pe-triage predict`` writes it. Reported per site: the flagged
features and each input feature's PSI/KS (HU: the pooled bin masses' PSI and their median HU).
Single-threaded; about two minutes at the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import machine  # noqa: E402  (the sibling benchmark's machine description)

from pe_triage.artifact import save_model  # noqa: E402
from pe_triage.config import (  # noqa: E402
    IngestConfig,
    ModelConfig,
    MonitorConfig,
    PreprocessConfig,
    SiteShift,
    SynthConfig,
    to_dict,
)
from pe_triage.dicom import Pseudonymizer, load_key  # noqa: E402
from pe_triage.ingest import ingest_site  # noqa: E402
from pe_triage.models import build_model  # noqa: E402
from pe_triage.monitoring.drift import drift_report, reference_acquisition  # noqa: E402
from pe_triage.monitoring.store import study_records  # noqa: E402
from pe_triage.predict import Triage, triage_report  # noqa: E402
from pe_triage.preprocess import resolve_windows  # noqa: E402
from pe_triage.synth import generate_cohort  # noqa: E402

PREPROCESS = PreprocessConfig(size=64, workers=1)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=25,
                    help="patients per site in each cohort (the numeric features' KS needs a few dozen studies)")
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--hu-offset", type=float, default=100.0, help="site-d's HU offset")
    ap.add_argument("--noise-scale", type=float, default=2.5, help="site-d's noise multiplier (a sharp kernel)")
    ap.add_argument("--kernel", default="B70f", help="site-d's ConvolutionKernel")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "drift-shift.json")
    return ap


def tiny_triage(work: Path) -> Triage:
    """Both stages with random weights (the input summary, not the scores, is under test)."""
    model = ModelConfig(arch="cbam_drn_d_22", width=0.125)
    windows = [w.to_dict() for w in resolve_windows(PREPROCESS)]
    paths = []
    for stage in (1, 2):
        torch.manual_seed(stage)
        meta = {"stage": stage, "model": to_dict(model), "windows": windows, "threshold": 0.5,
                "preprocess": to_dict(PREPROCESS) | {"workers": None}, "data": {}, "package_version": "benchmark"}
        paths.append(save_model(work / f"stage{stage}", build_model(model, len(windows)).eval(), meta, history=[]))
    return Triage.load(*paths)


def training_store(work: Path, synth: SynthConfig) -> Path:
    generate_cohort(work / "train", synth, key=load_key(demo=True))
    for site in sorted((work / "train" / "sites").iterdir()):
        ingest_site(site.name, str(site / "dicom"), str(work / "slices"), pseudo=Pseudonymizer(load_key(demo=True), site.name),
                    labels=str(site / "labels.csv"), config=IngestConfig(workers=1))
    return work / "slices"


def studies(site: Path) -> list[list[str]]:
    """The site's DICOM files grouped by study (one predict call each, as a PACS sends them)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for path in sorted((site / "dicom").rglob("*")):
        if path.is_file():
            groups[str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)].append(str(path))
    return list(groups.values())


def production_records(work: Path, synth: SynthConfig, triage: Triage) -> pd.DataFrame:
    generate_cohort(work / "prod", synth, key=load_key(demo=True))
    now, rows = datetime.now(UTC), []
    for site in sorted((work / "prod" / "sites").iterdir()):
        for files in studies(site):
            frame, summary = triage.predict_dicom(files, ingest=IngestConfig(workers=1))
            report = triage_report(frame, triage, model="benchmark", input_summary=summary) | {"model_version": "1"}
            rows += study_records(report, site=site.name, source="benchmark", now=now)
    return pd.DataFrame(rows)


def site_numbers(site: dict[str, Any]) -> dict[str, Any]:
    keep = ("psi", "ks", "value", "reference", "flagged")
    return {"studies": site["studies"], "flagged": site["flagged"],
            "input": {name: {k: v[k] for k in keep if k in v} for name, v in site["input"].items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    torch.set_num_threads(1)
    shift = SiteShift(sites=("site-d",), hu_offset=a.hu_offset, noise_scale=a.noise_scale, kernel=a.kernel)
    base = SynthConfig(sites=3, patients_per_site=a.patients, slices=a.slices, size=a.size, seed=1, write_tissue_maps=False)
    prod = SynthConfig(sites=4, patients_per_site=a.patients, slices=a.slices, size=a.size, seed=2, write_tissue_maps=False,
                       site_shift=shift)
    config = MonitorConfig()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pe-triage-drift-bench-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        reference = reference_acquisition(str(training_store(work, base)), config, PREPROCESS.crop)
        records = production_records(work, prod, tiny_triage(work))
    history = records.iloc[0:0]
    report = drift_report(records, history, reference, config, since=date.today(), until=None)
    result = {
        "benchmark": "drift_shift", "machine": machine(), "seconds": round(time.monotonic() - started, 1),
        "cohort": {"patients_per_site": a.patients, "slices": a.slices, "size": a.size, "training_sites": 3,
                   "shift": {"site": "site-d", "hu_offset": a.hu_offset, "noise_scale": a.noise_scale, "kernel": a.kernel}},
        "thresholds": report["thresholds"], "reference_studies": report["reference_studies"],
        "sites": {name: site_numbers(s) for name, s in report["sites"].items()},
        "shifted_site_flagged": bool(report["sites"]["site-d"]["flagged"]),
        "calibrated_sites_flagged": sorted(s for s in ("site-a", "site-b", "site-c") if report["sites"][s]["flagged"]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds", "shifted_site_flagged", "calibrated_sites_flagged")}))
    print(json.dumps({s: v["flagged"] for s, v in result["sites"].items()}))
    return result


if __name__ == "__main__":
    main()
