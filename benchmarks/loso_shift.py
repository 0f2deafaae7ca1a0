"""Does the leave-one-site-out gate flag a hospital with another acquisition convention? A controlled
comparison (issue 23's must-show): the same synthetic cohort and seeds twice, once as generated and
once with one site shifted (``synth.site_shift``: a sharp kernel's noise and an HU offset), each run
through the library's retraining steps: split -> both stages trained -> operating point -> pooled
test evaluation, then one fold per site (:mod:`pe_triage.evaluation.loso`) -> the summary -> the
promotion gates (``registry.evaluate_gates``, whose ``max_site_auroc_drop`` is the LOSO gate).

    python benchmarks/loso_shift.py --work /tmp/loso-shift [--patients-per-site 60 --samples 6000]
        [--hu-offset 200 --noise-scale 4] [--out benchmarks/results/loso-shift.json]

Single-threaded and small (the plain CNN baseline, 480-800 slices per site, one thread): 8-13
minutes per condition on one shared core. Measured (``results/loso-shift.json``: 3 sites x 100
patients, 96 px, 9,000 samples per stage; site-c shifted by +200 HU with kernel B70f): the
unshifted sites' held-out folds lost at most 0.09 of patient PE sensitivity, the shifted site's fold
0.61 (0.84 pooled, 0.23 at site-c), so ``max_site_pe_sensitivity_drop`` (0.15) passes the unshifted
cohort and fails the shifted one. The slice-AUROC gate did not separate them at this model strength:
its worst drop was 0.13 unshifted and 0.10 shifted (pooled AUROCs 0.69 / 0.89), within the noise
of a held-out site. Earlier runs at 64 px and 6,000 samples (``results/loso-shift-64px*.json``)
reached pooled AUROCs of 0.68 / 0.76 and separated nothing. The cohorts are built once per condition
in ``--work`` and reused while unchanged; the gates are judged afresh on every run.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pe_triage.config import (
    Config,
    EvalConfig,
    ModelConfig,
    PreprocessConfig,
    SiteShift,
    SynthConfig,
    TrainConfig,
    to_dict,
)
from pe_triage.dicom import Pseudonymizer, load_key
from pe_triage.evaluation.evaluate import evaluate
from pe_triage.evaluation.loso import WORST, site_folds, summarize, train_fold
from pe_triage.evaluation.operating_point import calibrate
from pe_triage.ingest import ingest_site
from pe_triage.preprocess import preprocess
from pe_triage.registry.registry import LOSO_KEY, evaluate_gates
from pe_triage.splits import split_dataset
from pe_triage.synth import generate_cohort
from pe_triage.training.train import train

#: the figures each condition reports per held-out site
SHOWN = ("slice_stage1_auroc", "slice_stage2_auroc", "patient_pe_sensitivity", "patient_disease_sensitivity")


def prepare(work: Path, synth: SynthConfig, config: Config) -> tuple[str, str]:
    """Cohort -> slices -> windows -> the pooled (ratio) splits in ``work``, rebuilt only when changed."""
    stamp, windows, splits = work / "cohort-config.json", work / "windows", work / "splits.parquet"
    wanted = json.dumps({"synth": to_dict(synth), "preprocess": to_dict(config.preprocess)}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted and splits.exists():
        return str(windows), str(splits)
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} holds another cohort or a partial one; give an empty --work folder")
    key = load_key(demo=True)
    generate_cohort(work / "cohort", synth, key=key)
    for site in sorted(p.name for p in (work / "cohort" / "sites").iterdir()):
        ingest_site(site, str(work / "cohort" / "sites" / site / "dicom"), str(work / "slices"), pseudo=Pseudonymizer(key, site),
                    labels=str(work / "cohort" / "sites" / site / "labels.csv"), config=replace(config.ingest, workers=1))
    preprocess(str(work / "slices"), str(windows), config=config.preprocess)
    split_dataset(str(windows), str(splits), config=config.split)
    stamp.write_text(wanted)
    return str(windows), str(splits)


def condition(work: Path, synth: SynthConfig, config: Config) -> dict[str, Any]:
    """One condition (its result reused while the cohort and configuration are unchanged)."""
    trained = {k: v for k, v in to_dict(config).items() if k != "registry"}  # the gates are judged afresh
    stamp = json.dumps({"synth": to_dict(synth), "config": trained}, sort_keys=True)
    done = work / "result.json"
    if done.exists() and json.loads(done.read_text())["stamp"] == stamp:
        return dict(json.loads(done.read_text())["result"])
    result = run_condition(work, synth, config)
    done.write_text(json.dumps({"stamp": stamp, "result": result}))
    return result


def run_condition(work: Path, synth: SynthConfig, config: Config) -> dict[str, Any]:
    """The main pair and its pooled test evaluation, the site folds, their summary and the gates."""
    t0 = time.monotonic()
    windows, splits = prepare(work, synth, config)
    for stage in (1, 2):
        train(windows, splits, str(work / f"stage{stage}"), stage=stage, config=config)
    calibrate(str(work / "stage1"), str(work / "stage2"), windows, splits, str(work / "cal1"), str(work / "cal2"),
              config=config)
    pooled = evaluate(str(work / "cal1"), str(work / "cal2"), windows, splits, str(work / "pooled"), config=config)
    folds, skipped = site_folds(windows, str(work / "site-splits.parquet"), config)
    for fold in folds:
        train_fold(windows, str(work / "site-splits.parquet"), fold, str(work / "folds" / fold), config=config)
    summary = summarize([str(work / "folds" / f) for f in folds], str(work / "pooled"), str(work / "loso"),
                        config=config, skipped=skipped)
    return {
        "pooled": {k: pooled["summary"].get(k) for k in SHOWN},
        "held_out": {site: {k: summary["folds"][site].get(k) for k in SHOWN} for site in summary["folds"]},
        "drops": summary.get("drops"),
        "worst": summary[WORST],
        "seconds": round(time.monotonic() - t0, 1),
    }


def loso_gates(result: dict[str, Any], config: Config) -> dict[str, Any]:
    """The leave-one-site-out gates (``max_site_*``) on a condition's summary, as promote would judge it."""
    summary = {"skipped": None, "drops": result["drops"], WORST: result["worst"]}
    gates = evaluate_gates({"summary": {}, LOSO_KEY: summary}, None, config.registry)
    return {g.name: {"passed": g.passed, "value": g.value, "threshold": g.threshold, "detail": g.detail}
            for g in gates if g.name.startswith("max_site_")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="folder for the two cohorts and their models")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--shifted", default="", help="the shifted site (default: the last one)")
    p.add_argument("--patients-per-site", type=int, default=60)
    p.add_argument("--slices", type=int, default=8)
    p.add_argument("--source-size", type=int, default=128)
    p.add_argument("--input", type=int, default=64)
    p.add_argument("--samples", type=int, default=6000, help="training samples per stage")
    p.add_argument("--arch", default="plain_cnn", help="plain_cnn learns the conspicuous cohort fastest on a CPU "
                   "(benchmarks/results/learning-conspicuous-*.json)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--hu-offset", type=float, default=200.0)
    p.add_argument("--noise-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/loso-shift.json"))
    return p


def configs(a: argparse.Namespace) -> tuple[SynthConfig, SiteShift, Config]:
    """The cohort, the shift and the (small, single-threaded) training configuration of the arguments."""
    synth = SynthConfig(sites=a.sites, patients_per_site=a.patients_per_site, slices=a.slices, size=a.source_size,
                        seed=a.seed, pe_fraction=0.45, other_fraction=0.3, pe_extent_slices=(6, 16),
                        write_tissue_maps=False, lesions="conspicuous")
    shifted = a.shifted or f"site-{chr(ord('a') + a.sites - 1)}"
    shift = SiteShift(sites=(shifted,), hu_offset=a.hu_offset, noise_scale=a.noise_scale, kernel="B70f")
    epoch = max(1, a.samples // 4)
    config = replace(
        Config(),
        preprocess=replace(PreprocessConfig(), size=a.input, windows=("vascular", "clinical_lung"), workers=1),
        model=ModelConfig(arch=a.arch, width=a.width, fusion="stacked", pooling="avgmax"),
        train=TrainConfig(windows=("vascular", "clinical_lung"), epochs=4, samples_per_epoch=epoch, batch_size=16,
                          lr=0.006, warmup_epochs=0.5, patience=0, num_workers=0, device="cpu", threads=1,
                          seed=a.seed),
        evaluate=EvalConfig(bootstrap=100, gradcam_per_category=0, gradcam_localisation=0),
    )
    return synth, shift, config


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    torch.set_num_threads(1)
    synth, shift, config = configs(a)
    result: dict[str, Any] = {
        "benchmark": "loso_shift", "torch_threads": 1, "cohort": to_dict(synth), "shift": to_dict(shift),
        "model": to_dict(config.model), "train": to_dict(config.train), "preprocess_size": config.preprocess.size,
        "conditions": {
            "no_shift": condition(a.work / "no-shift", synth, config),
            "shifted": condition(a.work / "shifted", replace(synth, site_shift=shift), config),
        },
    }
    for c in result["conditions"].values():
        c["gates"] = loso_gates(c, config)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({name: {"worst": c["worst"], "gates": {g: v["passed"] for g, v in c["gates"].items()}, "seconds": c["seconds"]}
                      for name, c in result["conditions"].items()}, indent=2))
    return result


if __name__ == "__main__":
    main()
