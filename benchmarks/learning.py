"""How fast and how well the two stages learn, and where a model fails when it does not: a CBAMDRN
next to the plain baseline (``--arch plain_cnn --width 1 --pooling avgmax``) at equal samples, on a
synthetic cohort of either lesion preset, labelled as a radiologist marks slices (slivers are
indeterminate and stay out of training and validation).

    python benchmarks/learning.py --work /tmp/learning [--patients-per-site 300 --slices 8]
        [--lesions realistic|conspicuous] [--samples 10000 --epoch-samples 2000]
        [--arch cbam_drn_d_54 --width 0.125 --fusion stacked --min-channels 16] [--lr 0.006]
        [--windows vascular,clinical_lung] [--device auto] [--out FILE]

On a GPU, the study's full-width model at clinical resolution (cohort built on the device):

    python benchmarks/learning.py --work /tmp/l --device cuda --arch cbam_drn_d_54 --width 1 --fusion branches \
        --source-size 512 --input 256 --samples 200000 --epoch-samples 20000 --workers 8

The cohort is built once in ``--work`` with the project's own steps (synth -> ingest -> preprocess
-> split, demo pseudonym key) and reused while its configuration is unchanged. Each stage is trained
by the real trainer for a fixed number of samples (deterministic, unlike a time budget; seconds are
reported). From the generator's ground truth, the best model's validation AUROC is then broken down
by lesion kind (stage 1: each kind vs WNL slices; stage 2: PE vs each other kind) and by the PE
lesion's area in model-input pixels, since a model that misses small emboli and one that learned
nothing look alike in one AUROC.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import torch

from pe_triage import schema as S
from pe_triage.artifact import load_model
from pe_triage.config import (
    Config,
    EvalConfig,
    LoaderConfig,
    ModelConfig,
    PreprocessConfig,
    SplitConfig,
    SynthConfig,
    TrainConfig,
    to_dict,
)
from pe_triage.dataset import WindowsDataset
from pe_triage.dicom import Pseudonymizer, load_key
from pe_triage.evaluation.evaluate import lesion_masks, slice_boxes
from pe_triage.evaluation.gradcam import Attribution, pointing_game
from pe_triage.ingest import ingest_site
from pe_triage.preprocess import preprocess
from pe_triage.splits import split_dataset
from pe_triage.stats import auroc
from pe_triage.synth import generate_cohort
from pe_triage.training.train import train

#: PE lesion area bins (model-input pixels the clot touches): below ~8 px a segmental clot is a dot or less
PE_AREA_BINS = ((0.0, 8.0), (8.0, 30.0), (30.0, float("inf")))


def prepare(work: Path, synth: SynthConfig, pre: PreprocessConfig) -> None:
    """The cohort, windows and splits in ``work`` (rebuilt only when the configuration changed)."""
    stamp = work / "cohort-config.json"
    wanted = json.dumps({"synth": to_dict(synth), "preprocess": to_dict(pre)}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted and (work / "splits.parquet").exists():
        return
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} holds another cohort or a partial one; give an empty --work folder")
    key = load_key(demo=True)  # the truth's source digests are keyed like the ingest
    generate_cohort(work / "cohort", synth, key=key)
    for site in sorted(p.name for p in (work / "cohort" / "sites").iterdir()):
        ingest_site(site, str(work / "cohort" / "sites" / site / "dicom"), str(work / "slices"),
                    pseudo=Pseudonymizer(key, site), labels=str(work / "cohort" / "sites" / site / "labels.csv"))
    preprocess(str(work / "slices"), str(work / "windows"), config=pre)
    split_dataset(str(work / "windows"), str(work / "splits.parquet"), config=SplitConfig())
    stamp.write_text(wanted)


def val_predictions(stage: int, work: Path, model_dir: Path, loader: LoaderConfig,
                    ev: EvalConfig = EvalConfig()) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """The stage's validation slices (as the trainer selects them) with lesion kind and lesion area
    (model-input pixels the lesion touches, as the evaluation's evidence-map check sees it), the model's
    probabilities for them, and the localisation: the evaluation's pointing game (its tolerance and
    attribution method) on up to ``ev.gradcam_localisation`` true positives at the stage's threshold."""
    model = load_model(model_dir)
    windows, truth = str(work / "windows"), str(work / "cohort" / "truth")
    with WindowsDataset(windows, str(work / "splits.parquet"), split="val", stage=stage,
                        windows_used=model.meta.window_names, config=loader, context=model.meta.model.context) as ds:
        prob = model.predict_proba(ds.inputs(slice(None)))
        boxes = slice_boxes(windows, ds.index)
        masks = lesion_masks(truth, boxes, ds.shape[-1])
        frame = ds.index.assign(**{S.SOURCE_HMAC: boxes[S.SOURCE_HMAC]})
        positive = np.flatnonzero((np.asarray(ds.targets) == 1) & (prob >= model.meta.threshold))
        rows = [int(frame.index[i]) for i in positive if int(frame.index[i]) in masks and masks[int(frame.index[i])].any()]
        measured = sorted(np.random.default_rng(0).permutation(rows)[: ev.gradcam_localisation].tolist())
        position = {int(r): i for i, r in enumerate(frame.index)}
        game = pointing_game(model.model, ds.inputs([position[r] for r in measured]), [masks[r] for r in measured],
                             tolerance=ev.gradcam_pointing_tolerance_px, attribution=Attribution.of(ev))
    frame["lesion_px"] = [float(masks[i].sum()) if i in masks else 0.0 for i in frame.index]
    kinds = pads.dataset(sorted(Path(truth).glob("*.parquet")), format="parquet").to_table(
        columns=[S.SOURCE_HMAC, S.T_LESION]).to_pandas()
    localisation = {"true_positives": len(rows), "measured": game.slices, "peak_on_lesion": game.hits,
                    "peak_on_lesion_rate": game.rate, "blank_maps": game.blank,
                    "mean_inside_fraction": game.mean_inside_fraction, "method": Attribution.of(ev).label,
                    "tolerance_px": ev.gradcam_pointing_tolerance_px}
    return frame.merge(kinds, on=S.SOURCE_HMAC, how="left", validate="one_to_one"), prob, localisation


def breakdown(stage: int, frame: pd.DataFrame, prob: np.ndarray) -> dict[str, Any]:
    """Validation AUROC per lesion kind and per PE area bin (with the number of positive slices)."""
    kind = frame[S.T_LESION].to_numpy()
    negative = kind == "none" if stage == 1 else (frame[S.LABEL] == "other").to_numpy()
    out: dict[str, Any] = {}

    def add(name: str, positive: np.ndarray, against: np.ndarray) -> None:
        sel = positive | against
        if positive.any() and against.any():
            out[name] = {"auroc": auroc(positive[sel].astype(int), prob[sel]), "positives": int(positive.sum())}

    if stage == 1:
        for k in sorted(set(kind) - {"none"}):
            add(k, kind == k, negative)
    else:
        pe = (frame[S.LABEL] == "pe").to_numpy()
        for k in sorted(set(kind) - {"none", "pe"}):
            add(f"pe_vs_{k}", pe, (kind == k) & negative)
    for lo, hi in PE_AREA_BINS:
        in_bin = (kind == "pe") & (frame["lesion_px"] >= lo).to_numpy() & (frame["lesion_px"] < hi).to_numpy()
        add(f"pe_area_{lo:g}_{hi:g}px", in_bin, negative)
    return out


def run_stage(stage: int, work: Path, config: Config, out: Path | None = None) -> dict[str, Any]:
    """Train ``stage`` on the cohort in ``work`` (into ``out``, default ``work/model-stage<stage>``) and
    measure it on validation."""
    out = out or work / f"model-stage{stage}"
    t0 = time.monotonic()
    meta = train(str(work / "windows"), str(work / "splits.parquet"), str(out), stage=stage, config=config)
    seconds = time.monotonic() - t0
    history = json.loads((out / "history.json").read_text())
    frame, prob, localisation = val_predictions(stage, work, out, config.loader, config.evaluate)
    per_epoch = config.train.samples_per_epoch or 0
    return {
        "val_auroc": meta["val"]["auroc"], "best_epoch": meta["best_epoch"], "train_seconds": round(seconds, 1),
        "samples_seen": per_epoch * meta["epochs_run"],
        "history": [{"epoch": h["epoch"], "samples": per_epoch * h["epoch"], "val_auroc": h["val_auroc"],
                     "train_loss": round(h["train_loss"], 4), "images_per_s": round(h["train_images_per_s"], 1)} for h in history],
        "val_breakdown": breakdown(stage, frame, prob),
        "localisation": localisation,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--patients-per-site", type=int, default=300)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--source-size", type=int, default=256)
    ap.add_argument("--input", type=int, default=128, help="model input size (preprocess size)")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--lesions", default="realistic", help="synth lesion preset")
    ap.add_argument("--comorbid", type=float, default=SynthConfig().pe_comorbid_fraction,
                    help="PE patients who also have other disease (synth.pe_comorbid_fraction)")
    ap.add_argument("--windows", default="vascular,clinical_lung")
    ap.add_argument("--arch", default="cbam_drn_d_54")
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--min-channels", type=int, default=16)
    ap.add_argument("--fusion", default="stacked")
    ap.add_argument("--context", type=int, default=0, help="neighbouring slices on each side (model.context)")
    ap.add_argument("--pooling", default="avg")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--samples", type=int, default=10000, help="training samples per stage")
    ap.add_argument("--epoch-samples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/learning-<lesions>-<arch>-<input>px.json")
    return ap


def cohort(a: argparse.Namespace) -> tuple[SynthConfig, PreprocessConfig]:
    """The cohort and preprocessing the arguments ask for, built in ``a.work`` (once)."""
    synth = SynthConfig(sites=a.sites, patients_per_site=a.patients_per_site, slices=a.slices, size=a.source_size,
                        seed=a.seed, pe_fraction=0.45, other_fraction=0.3, pe_extent_slices=(6, 16), write_tissue_maps=False,
                        lesions=a.lesions, pe_comorbid_fraction=a.comorbid)
    pre = replace(PreprocessConfig(), size=a.input, windows=tuple(a.windows.split(",")))
    prepare(a.work, synth, pre)
    return synth, pre


def run_config(a: argparse.Namespace, *, context: int | None = None, seed: int | None = None) -> Config:
    """The training configuration of the arguments (``context``/``seed`` override theirs)."""
    epochs = max(1, a.samples // a.epoch_samples)
    return Config(
        model=ModelConfig(arch=a.arch, width=a.width, min_channels=a.min_channels, fusion=a.fusion, pooling=a.pooling,
                          context=a.context if context is None else context),
        loader=LoaderConfig(cache_dir=str(a.work / "cache")),
        train=TrainConfig(windows=tuple(a.windows.split(",")), epochs=epochs, batch_size=a.batch, lr=a.lr,
                          samples_per_epoch=a.epoch_samples, patience=0, warmup_epochs=min(1.0, epochs / 10),
                          device=a.device, seed=a.train_seed if seed is None else seed, num_workers=a.workers),
    )


def machine() -> dict[str, Any]:
    return {"machine": platform.machine(), "cpus": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.monotonic()
    synth, _ = cohort(a)
    prepare_s = time.monotonic() - t0
    config = run_config(a)
    result = {
        "benchmark": "learning", **machine(),
        "cohort": to_dict(synth), "preprocess_size": a.input, "prepare_seconds": round(prepare_s, 1),
        "model": to_dict(config.model), "train": to_dict(config.train),
        "stages": {f"stage{s}": run_stage(int(s), a.work, config) for s in a.stages.split(",")},
    }
    out = a.out or Path(f"benchmarks/results/learning-{a.lesions}-{a.arch}-{a.input}px.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {"val_auroc": v["val_auroc"], "train_seconds": v["train_seconds"]} for k, v in result["stages"].items()}, indent=2))
    return result


if __name__ == "__main__":
    main()
