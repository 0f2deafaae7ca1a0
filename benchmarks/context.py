"""2-D against 2.5-D slice models (``model.context``) and the patient rules against the exam model,
same cohort, same sample budget, same seeds: does a slice's neighbourhood along z help, where, and
does a sequence model over the slices decide patients better than the study's "any positive slice"?

    OMP_NUM_THREADS=1 python benchmarks/context.py --work /tmp/context --threads 1 --workers 0
        [--contexts 0,1 --seeds 0,1,2] [--lesions realistic|conspicuous] [--patients-per-site 240]
        [--input 96] [--samples 3000 --epoch-samples 1500] [--out FILE]

On a GPU, the study's full-width model at clinical resolution, contexts 0 (the paper's 2-D), 1 and 2:

    python benchmarks/context.py --work /tmp/c --device cuda --width 1 --fusion branches --source-size 512 \\
        --input 256 --slices 40 --patients-per-site 300 --samples 200000 --epoch-samples 20000 --workers 8 \\
        --contexts 0,1,2 --seeds 0,1,2 --lesions realistic --out benchmarks/results/context-realistic-256px-gpu.json

Per seed and context, both stages are trained by the real trainer (``benchmarks/learning.py`` builds
the cohort and measures each stage: validation AUROC per lesion kind and per PE lesion size bin).
The exam model (``ExamConfig`` defaults, the run's seed) is then fitted on that pair's frozen slice
features of the train patients and early-stopped on val, and ``benchmarks/exam.py``'s comparison
measures every patient rule (any, k_consecutive at ``evaluate.k``, top_k_mean) and the exam model on
the test patients, each with its thresholds chosen on the val patients by the same joint search:
per-patient AUROC, sensitivity and specificity for disease and for PE, and specificity at a matched
95% sensitivity. The summary gives mean and sd over the seeds of each figure per context; the JSON
is rewritten after every run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from dataclasses import replace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exam  # noqa: E402  (the sibling benchmark: every patient rule and the exam model on a stage pair)
import learning  # noqa: E402  (the sibling benchmark: cohort, training and per-stage measures)

from pe_triage.config import Config, to_dict  # noqa: E402

#: The defaults size a CPU run (one thread, 96 px, about an hour for contexts 0,1 x seeds 0,1,2 on the
#: shared 2-core machine): 240 patients per site give 144 test patients (the 5:3:2 split of 720; 62 with
#: PE), so one patient moves the per-patient PE sensitivity by 1.6 points (learning.py's 3 x 150 would
#: leave ~40 PE test patients, 2.5 points); the samples are what that hour trains besides the embedding.
PATIENTS_PER_SITE = 240
INPUT = 96
SAMPLES = 3000
EPOCH_SAMPLES = 1500
#: the exam model variant trained on every pair (``ExamConfig`` defaults: a GRU over all features)
EXAM_VARIANT = ("gru", "all")


def one_run(work: Path, config: Config, name: str) -> dict[str, Any]:
    """Both stages of one (context, seed), the exam model on that pair, and what each reaches: per
    slice on val, per patient on test (every rule's and the exam model's thresholds chosen on val)."""
    stages = {s: learning.run_stage(s, work, config, out=work / name / f"stage{s}") for s in (1, 2)}
    figures: dict[str, Any] = {f"stage{s}_val_auroc": r["val_auroc"] for s, r in stages.items()}
    figures |= {f"stage{s}_{k}": v["auroc"] for s, r in stages.items() for k, v in r["val_breakdown"].items()}
    paths = {f"stage{s}": str(work / name / f"stage{s}") for s in stages} | {
        "windows": str(work / "windows"), "splits": str(work / "splits.parquet")}
    pair = exam.compare_pair(paths, [EXAM_VARIANT], config, None)
    figures |= {f"patient_{row}_{k}": v for row, figs in pair["figures"].items() for k, v in figs.items()}
    return {"figures": figures, "train_seconds": {f"stage{s}": r["train_seconds"] for s, r in stages.items()},
            "exam_fit_seconds": pair["fit_seconds"], "embed_seconds": pair["embed_seconds"], "patients": pair["exams"],
            "rows": pair["rows"]}


def table(result: dict[str, Any]) -> list[str]:
    """The summary as a markdown table: a row per figure, a column per context (mean ± sd over seeds)."""
    contexts = result["contexts"]
    names = list(dict.fromkeys(k for c in contexts.values() for k in c["summary"]))
    lines = ["| figure | " + " | ".join(f"context {c}" for c in contexts) + " |", "|---" * (len(contexts) + 1) + "|"]
    for name in names:
        cells = [f"{s['mean']:.3f} ± {s['sd']:.3f}" if (s := c["summary"].get(name)) else "–" for c in contexts.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


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


def write(result: dict[str, Any], runs: dict[int, dict[str, Any]], configs: dict[int, Config], out: Path) -> None:
    """The result so far (rewritten after every run: a long run that stops early keeps what it measured)."""
    result["contexts"] = {str(c): {"model": to_dict(configs[c].model), "train": to_dict(configs[c].train),
                                   "exam": to_dict(configs[c].exam), "summary": summarise(list(r.values())), "runs": r}
                          for c, r in runs.items() if r}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = learning.parser()
    ap.description = __doc__.split("\n\n")[0]
    ap.add_argument("--contexts", default="0,1", help="model.context values to compare")
    ap.add_argument("--seeds", default="0,1,2", help="training and exam-model seeds (one cohort)")
    ap.set_defaults(samples=SAMPLES, epoch_samples=EPOCH_SAMPLES, patients_per_site=PATIENTS_PER_SITE, input=INPUT)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.monotonic()
    synth, _ = learning.cohort(a)
    result: dict[str, Any] = {"benchmark": "context", **learning.machine(), "cohort": to_dict(synth),
                              "preprocess_size": a.input, "prepare_seconds": round(time.monotonic() - t0, 1)}
    contexts = [int(c) for c in a.contexts.split(",")]
    runs: dict[int, dict[str, Any]] = {c: {} for c in contexts}
    configs: dict[int, Config] = {}
    out = a.out or Path(f"benchmarks/results/context-{a.lesions}-{a.input}px.json")
    for seed in (int(s) for s in a.seeds.split(",")):  # seeds outside: every context has as many runs at any time
        for context in contexts:
            config = learning.run_config(a, context=context, seed=seed)
            configs[context] = replace(config, exam=replace(config.exam, seed=seed))
            runs[context][str(seed)] = one_run(a.work, configs[context], f"context{context}-seed{seed}")
            write(result, runs, configs, out)
    for line in table(result):
        print(line)
    return result


if __name__ == "__main__":
    main()
