"""The exam-level model against the patient rules, on trained pipeline runs (issue 21 item 2).

    taskset -c 0 python benchmarks/exam.py [--roots /tmp/demo2/a/seed-0,/tmp/demo2/b/seed-1,/tmp/demo2/c/seed-2]
        [--variants gru:all,attention:all,gru:logits,gru:embeddings] [--out FILE]

For each root (a ``pe-triage-retraining`` pipeline run: its calibrated stage models, windows and
splits), every slice of train, val and test is embedded once by both frozen stage models. The exam
model (each ``arch:features`` variant, ``ExamConfig`` defaults otherwise) is fitted on train and
early-stopped on val. Every patient rule (any, k_consecutive with ``evaluate.k``, top_k_mean) and
every exam model variant then gets its thresholds on the val patients by the same joint search
(``operating_point.choose_thresholds`` at the operating point's 95%/95% targets) and is measured on
the test patients: per-patient AUROC, sensitivity and specificity for disease and for PE. The
summary gives mean and sd over the roots. ``taskset -c 0`` keeps it on one core (the embedding uses
one torch thread per available CPU).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pe_triage.artifact import StageModel, load_model
from pe_triage import schema as S
from pe_triage.config import Config, EvalConfig, to_dict
from pe_triage.evaluation.exam import EXAM, compare_rules, exam_frame
from pe_triage.evaluation.metrics import RULES, patient_predictions
from pe_triage.provenance import file_digest
from pe_triage.training.exam import embed_split, exam_probabilities, exams, feature_columns, fit_exam

SPLITS = ("train", "val", "test")
#: the sensitivity at which specificity is compared on the test ROC (the operating point's target)
MATCHED = 0.95
FIGURES = ("auroc", "sensitivity", "specificity")


def find_run(root: str) -> dict[str, str]:
    """The calibrated models, windows and splits of the pipeline runs under ``root`` (newest first)."""
    def one(pattern: str, marker: str = "") -> str:
        found = sorted(glob.glob(f"{root}/kfp/pe-triage-retraining-*/{pattern}"), reverse=True)
        found = [f for f in found if not marker or Path(f, marker).exists()]
        if not found:
            raise SystemExit(f"{root}: no {pattern}")
        return found[0]
    return {"stage1": one("calibrate/calibrated_stage1", "model.json"), "stage2": one("calibrate/calibrated_stage2", "model.json"),
            "windows": one("preprocess/windows"), "splits": one("split/splits")}


def flat(row: dict[str, Any]) -> dict[str, float | None]:
    return {f"{t}_{f}": (row[t][f] if f == "auroc" else row[t][f]["value"]) for t in ("disease", "pe") for f in FIGURES}


def embedded_split(models: dict[int, StageModel], paths: dict[str, str], split: str, config: Config,
                   cache: Path | None) -> tuple[pd.DataFrame, np.ndarray]:
    """:func:`embed_split`, kept in ``cache`` (keyed by the stage weights) for a rerun with other variants."""
    key = hashlib.sha256("".join(file_digest(f"{paths[f'stage{n}']}/model.pt") for n in (1, 2)).encode()).hexdigest()[:16]
    files = (cache / f"{key}-{split}.parquet", cache / f"{key}-{split}.npy") if cache else None
    if files and all(f.exists() for f in files):
        return pd.read_parquet(files[0]), np.load(files[1])
    pred, x = embed_split(models, paths["windows"], paths["splits"], split=split, config=config)
    if files:
        cache.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        pred.to_parquet(files[0])
        np.save(files[1], x)
    return pred, x


def spec_at_sensitivity(y: np.ndarray, score: np.ndarray, sensitivity: float) -> float | None:
    """Specificity at the highest threshold that keeps ``sensitivity`` of the positives (read off the
    test ROC: every row compared at the same sensitivity, free of the val thresholds' noise)."""
    pos = np.sort(score[y])[::-1]
    if not pos.size or y.all():
        return None
    threshold = pos[int(np.ceil(sensitivity * pos.size)) - 1]
    return float((score[~y] < threshold).mean())


def matched(frame: pd.DataFrame, ec: EvalConfig, sensitivity: float) -> dict[str, float | None]:
    """Per-patient specificity at matched sensitivity, disease and PE (PE: the rule over every slice's
    p_pe, no stage 1 gate)."""
    pt = patient_predictions(frame, threshold_stage1=0.0, threshold_stage2=0.0, config=ec)
    pt = pt[pt["truth"] != S.Label.INDETERMINATE.value]
    truth = pt["truth"].to_numpy(object)
    return {f"{target}_spec_at_{round(100 * sensitivity)}sens": spec_at_sensitivity(
        np.isin(truth, S.STAGES[n].positive_labels), pt[f"{target}_score"].to_numpy(float), sensitivity)
        for n, target in ((1, "disease"), (2, "pe"))}


def one_root(root: str, variants: list[tuple[str, str]], config: Config, cache: Path | None) -> dict[str, Any]:
    """Every rule and exam variant on one pipeline run."""
    return compare_pair(find_run(root), variants, config, cache)


def compare_pair(paths: dict[str, str], variants: list[tuple[str, str]], config: Config, cache: Path | None) -> dict[str, Any]:
    """Every rule and exam variant on one stage pair (``paths``: stage1, stage2, windows, splits);
    ``benchmarks/context.py`` calls it for each slice-model pair it trains."""
    models = {n: load_model(paths[f"stage{n}"]) for n in (1, 2)}
    t0 = time.monotonic()
    embedded = {s: embedded_split(models, paths, s, config, cache) for s in SPLITS}
    embed_s = time.monotonic() - t0
    data = {s: exams(*embedded[s]) for s in SPLITS}
    dims = [int(m.model.head.in_features) for m in models.values()]
    slices = {s: embedded[s][0] for s in SPLITS}
    rows: dict[str, Any] = {}
    fit_s: dict[str, float] = {}
    at: dict[str, dict[str, float | None]] = {}
    for arch, features in variants:
        name = f"{arch}:{features}"
        cols = feature_columns(dims, features)  # type: ignore[arg-type]
        d = {s: data[s].select(cols) for s in SPLITS}
        t1 = time.monotonic()
        net, history = fit_exam(d["train"], d["val"], replace(config.exam, arch=arch, features=features))  # type: ignore[arg-type]
        fit_s[name] = round(time.monotonic() - t1, 1)
        frames = {s: exam_frame(d[s].keys, d[s].truth, exam_probabilities(net, d[s])) for s in ("val", "test")}
        table = compare_rules(slices, frames, config=config)
        rows |= {k: v for k, v in table.items() if k != EXAM} | {f"exam[{name}]": table[EXAM] | {"epochs": len(history)}}
        at[f"exam[{name}]"] = matched(frames["test"], replace(config.evaluate, patient_rule="any"), MATCHED)
    at |= {rule: matched(slices["test"], replace(config.evaluate, patient_rule=rule), MATCHED) for rule in RULES}
    return {"paths": paths, "exams": {s: len(data[s].keys) for s in SPLITS}, "slices": {s: len(slices[s]) for s in SPLITS},
            "embed_seconds": round(embed_s, 1), "fit_seconds": fit_s, "rows": rows,
            "figures": {name: flat(row) | at[name] for name, row in rows.items()}}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | int]]]:
    """Mean, sd and count over roots of every figure of every row."""
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for name in runs[0]["figures"]:
        out[name] = {}
        for key in runs[0]["figures"][name]:
            v = np.array([r["figures"][name][key] for r in runs if r["figures"][name][key] is not None], float)
            if len(v):
                out[name][key] = {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4),
                                  "n": len(v)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--roots", default="/tmp/demo2/a/seed-0,/tmp/demo2/b/seed-1,/tmp/demo2/c/seed-2")
    ap.add_argument("--variants", default="gru:all,attention:all,gru:logits,gru:embeddings")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/exam-demo.json"))
    ap.add_argument("--cache", type=Path, default=None, help="keep the slice embeddings here for reruns")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    config = Config()
    variants = [(v.split(":")[0], v.split(":")[1]) for v in a.variants.split(",")]
    t0 = time.monotonic()
    runs = {root: one_root(root, variants, config, a.cache) for root in a.roots.split(",")}
    result = {"benchmark": "exam", "machine": platform.machine(), "torch_threads": 1, "exam": to_dict(config.exam),
              "operating_point": to_dict(config.operating_point), "k": config.evaluate.k,
              "seconds": round(time.monotonic() - t0, 1), "embeddings_cache": str(a.cache) if a.cache else None, "summary": summarise(list(runs.values())), "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, figs in result["summary"].items():
        print(f"{name:24s} " + "  ".join(f"{k} {v['mean']:.3f}±{v['sd']:.3f}" for k, v in figs.items()))
    return result


if __name__ == "__main__":
    main()
