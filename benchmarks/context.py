"""2-D against 2.5-D slice models (``model.context``), same cohort, same sample budget, same seeds:
does a slice's neighbourhood along z help, where, and does it reach the patient decision?

    python benchmarks/context.py --work /tmp/context [--contexts 0,1 --seeds 0,1,2]
        [--lesions realistic|conspicuous] [--samples 15000 --epoch-samples 2500] [--out FILE]

On a GPU, at the study's width and clinical resolution:

    python benchmarks/context.py --work /tmp/c --device cuda --width 1 --fusion branches --source-size 512 \\
        --input 256 --slices 40 --samples 200000 --epoch-samples 20000 --workers 8 --contexts 0,1,2

Per context and training seed, both stages are trained by the real trainer (``benchmarks/learning.py``
builds the cohort and measures each stage: validation AUROC per lesion kind and PE size). The pair
then triages the validation patients under the study's rule (any positive slice) at the stages' own
thresholds: per-patient AUROC, sensitivity and specificity for disease and for PE. The summary
gives mean and sd over the seeds of each figure per context. The exam-level model of issue 21 is not
built yet: the patient rule is the study's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning  # noqa: E402  (the sibling benchmark: cohort, training and per-stage measures)

from pe_triage.artifact import load_model  # noqa: E402
from pe_triage.config import Config, to_dict  # noqa: E402
from pe_triage.evaluation.evaluate import predict_split  # noqa: E402
from pe_triage.evaluation.metrics import evaluate_predictions  # noqa: E402


def patient_figures(work: Path, models: dict[int, Path], config: Config) -> dict[str, float | None]:
    """Per-patient disease and PE figures of the pair on the validation split (the study's rule)."""
    loaded = {stage: load_model(path) for stage, path in models.items()}
    pred = predict_split(loaded, str(work / "windows"), str(work / "splits.parquet"), split="val", config=config)
    metrics = evaluate_predictions(pred, threshold_stage1=loaded[1].meta.threshold, threshold_stage2=loaded[2].meta.threshold,
                                   config=config.evaluate)
    out: dict[str, float | None] = {}
    for target in ("disease", "pe"):
        table = metrics["patient"][target]
        for figure in ("auroc", "sensitivity", "specificity"):
            out[f"patient_{target}_{figure}"] = table[figure]["value"]
    return out


def one_run(work: Path, config: Config, name: str) -> dict[str, Any]:
    """Both stages of one (context, seed) and what they reach, per slice and per patient."""
    stages = {s: learning.run_stage(s, work, config, out=work / name / f"stage{s}") for s in (1, 2)}
    figures: dict[str, Any] = {f"stage{s}_val_auroc": r["val_auroc"] for s, r in stages.items()}
    figures |= {f"stage{s}_{k}": v["auroc"] for s, r in stages.items() for k, v in r["val_breakdown"].items()}
    figures |= patient_figures(work, {s: work / name / f"stage{s}" for s in stages}, config)
    return {"figures": figures, "train_seconds": {f"stage{s}": r["train_seconds"] for s, r in stages.items()}}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Mean, sd and count over seeds of every figure the runs report."""
    names = sorted({k for r in runs for k in r["figures"]})
    out = {}
    for name in names:
        values = np.array([r["figures"][name] for r in runs if r["figures"].get(name) is not None], float)
        if len(values):
            out[name] = {"mean": round(float(values.mean()), 4), "sd": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4),
                         "n": len(values)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = learning.parser()
    ap.description = __doc__.split("\n\n")[0]
    ap.add_argument("--contexts", default="0,1", help="model.context values to compare")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (one cohort)")
    ap.set_defaults(samples=15000, epoch_samples=2500)
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    synth, _ = learning.cohort(a)
    result: dict[str, Any] = {"benchmark": "context", **learning.machine(), "cohort": to_dict(synth),
                              "preprocess_size": a.input, "prepare_seconds": round(time.monotonic() - t0, 1), "contexts": {}}
    for context in (int(c) for c in a.contexts.split(",")):
        runs = {}
        for seed in (int(s) for s in a.seeds.split(",")):
            config = learning.run_config(a, context=context, seed=seed)
            runs[str(seed)] = one_run(a.work, config, f"context{context}-seed{seed}")
        result["contexts"][str(context)] = {"model": to_dict(config.model), "train": to_dict(config.train),
                                            "summary": summarise(list(runs.values())), "runs": runs}
    out = a.out or Path(f"benchmarks/results/context-{a.lesions}-{a.input}px.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("stage1_val_auroc", "stage2_val_auroc", "patient_pe_auroc", "patient_pe_sensitivity", "patient_pe_specificity")
    for context, r in result["contexts"].items():
        print(f"context {context}: " + ", ".join(f"{k} {r['summary'][k]['mean']:.3f}±{r['summary'][k]['sd']:.3f}"
                                                 for k in keys if k in r["summary"]))
    return result


if __name__ == "__main__":
    main()
