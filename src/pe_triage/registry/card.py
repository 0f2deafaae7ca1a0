"""The model card of a registered version (Markdown, logged with it as ``model_card.md``): intended use,
models, data, metrics overall and per site, limits, provenance; written for the radiologists and IT
staff who decide whether to load the version, from the stage models' metadata and the metrics alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pe_triage.predict import DecisionRule


def fmt(value: Any) -> str:
    """A metric as people read it: 4 decimals, ``n/a`` for one that could not be measured."""
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def training_sites(meta1: Mapping[str, Any], meta2: Mapping[str, Any]) -> list[str]:
    """The sites either stage model was trained on."""
    return sorted({*((meta1.get("data") or {}).get("sites") or []), *((meta2.get("data") or {}).get("sites") or [])})


_SUMMARY_NAMES = {
    "slice_stage1_accuracy": "slice: stage 1 accuracy (WNL vs disease)",
    "slice_disease_sensitivity": "slice: disease sensitivity",
    "slice_wnl_sensitivity": "slice: WNL sensitivity (specificity)",
    "slice_stage1_auroc": "slice: stage 1 AUROC",
    "slice_stage1_auroc_ci_low": "slice: stage 1 AUROC, lower confidence bound",
    "slice_stage2_accuracy": "slice: stage 2 accuracy (PE vs other, disease slices)",
    "slice_pe_sensitivity": "slice: PE sensitivity (stage 2)",
    "slice_pe_specificity": "slice: PE specificity (stage 2, other-disease slices)",
    "slice_stage2_auroc": "slice: stage 2 AUROC",
    "slice_stage2_auroc_ci_low": "slice: stage 2 AUROC, lower confidence bound",
    "slice_cascade_accuracy": "slice: cascade accuracy (wnl/other/pe)",
    "patient_accuracy": "patient: disease accuracy",
    "patient_disease_sensitivity": "patient: disease sensitivity",
    "patient_wnl_sensitivity": "patient: WNL sensitivity",
    "patient_pe_sensitivity": "patient: PE sensitivity",
    "patient_pe_specificity": "patient: PE specificity (non-PE patients not flagged)",
    "patient_cascade_accuracy": "patient: cascade accuracy",
    "slices": "slices",
    "patients": "patients",
}


def _windows(meta: Mapping[str, Any]) -> str:
    return ", ".join(f"{w['name']} ({w['lo']:g}..{w['hi']:g} HU)" for w in meta["windows"])


def _operating_point(meta: Mapping[str, Any], stage: int) -> str:
    op = meta.get("operating_point")
    if not op or op.get("level") == "slice":
        return f"{fmt(meta.get('target_sensitivity'))} of the validation slices"
    target = op["patient_disease_sensitivity"] if stage == 1 else op["patient_pe_sensitivity"]
    exams = "exams with disease flagged" if stage == 1 else "PE exams called PE by the cascade"
    return f"{fmt(target)} of the {op.get('split', 'val')} {exams}"


_INTENDED_USE = [
    "## Intended use",
    "",
    "Worklist triage of contrast-enhanced chest CT (CT pulmonary angiography) of adults: each axial slice is",
    "classified WNL vs disease (stage 1), disease slices PE vs other disease (stage 2), and studies the",
    "per-patient rule calls PE are flagged for an earlier read. Decision support for radiologists only:",
    "not a diagnosis, and never a reason to skip or delay reading a study.",
]


def model_card(meta1: Mapping[str, Any], meta2: Mapping[str, Any], metrics: Mapping[str, Any], *,
               rule: DecisionRule = DecisionRule(), name: str = "pe-triage", exam: Mapping[str, Any] | None = None) -> str:
    """The Markdown model card of a composite version: intended use, models (and the exam model's
    description, ``predict.exam_description``, when it carries one), data, metrics overall and per
    site, limits, provenance."""
    sites = training_sites(meta1, meta2)
    sections = [
        [f"# {name}: two-stage chest-CT pulmonary-embolism triage"],
        _INTENDED_USE,
        _models(meta1, meta2, rule) + _exam(exam, rule),
        _data(meta1, sites, metrics["test_data"]),
        _metrics(metrics),
        *([_loso(metrics["leave_one_site_out"])] if metrics.get("leave_one_site_out") else []),
        _limits(sites),
        _provenance(meta1, meta2),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _models(meta1: Mapping[str, Any], meta2: Mapping[str, Any], rule: DecisionRule) -> list[str]:
    v1, v2 = meta1.get("val") or {}, meta2.get("val") or {}
    pre = meta1.get("preprocess") or {}
    return [
        "## Models",
        "",
        "| | stage 1 | stage 2 |",
        "|---|---|---|",
        "| task | WNL vs disease, every slice | PE vs other disease, disease slices |",
        (f"| architecture | {meta1['model']['arch']} (width {meta1['model'].get('width', 1.0)}) | "
         f"{meta2['model']['arch']} (width {meta2['model'].get('width', 1.0)}) |"),
        f"| windows | {_windows(meta1)} | {_windows(meta2)} |",
        f"| operating threshold | {fmt(float(meta1['threshold']))} | {fmt(float(meta2['threshold']))} |",
        f"| chosen for | {_operating_point(meta1, 1)} | {_operating_point(meta2, 2)} |",
        f"| validation AUROC | {fmt(v1.get('auroc'))} | {fmt(v2.get('auroc'))} |",
        "",
        f"Input: {pre.get('size', '?')} px crops, crop mode `{(pre.get('crop') or {}).get('mode', '?')}`. Per-patient rule: "
        f"`{rule.rule}`" + ("" if rule.rule == "any" else f" (k = {rule.k})") + ".",
    ]


def _exam(exam: Mapping[str, Any] | None, rule: DecisionRule) -> list[str]:
    if exam is None:
        return []
    t = exam["thresholds"]
    role = "it decides each study" if rule.rule == "exam" else "its figures are reported beside the rule's decision"
    return ["", f"Exam-level model: `{exam['arch']}` over the slices' `{exam['features']}` features, thresholds "
                f"{fmt(float(t['disease']))} (disease) / {fmt(float(t['pe']))} (PE), chosen on validation exams; {role}."]


def _data(meta1: Mapping[str, Any], sites: list[str], test: Mapping[str, Any]) -> list[str]:
    d1 = meta1.get("data") or {}
    return [
        "## Data",
        "",
        f"- Training sites: {', '.join(sites) or 'unknown'}; fold `{d1.get('fold', '?')}`.",
        f"- Windows dataset digest `{d1.get('windows_digest', '?')}`, splits digest `{d1.get('splits_digest', '?')}`.",
        (f"- Test data: split `{test.get('split', '?')}` of fold `{test.get('fold', '?')}`, {test.get('patients', '?')} "
         f"patients, {test.get('slices', '?')} slices (windows digest `{test.get('windows_digest', '?')}`, splits digest "
         f"`{test.get('splits_digest', '?')}`)."),
    ]


def _metrics(metrics: Mapping[str, Any]) -> list[str]:
    per_site = metrics.get("per_site") or {}
    lines = [
        "## Metrics on the test data",
        "",
        "| metric | all sites | " + " | ".join(per_site) + " |",
        "|---|---|" + "---|" * len(per_site),
    ]
    for key, label in _SUMMARY_NAMES.items():
        row = [fmt(metrics["summary"].get(key)), *(fmt((s.get("summary") or {}).get(key)) for s in per_site.values())]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def _loso(loso: Mapping[str, Any]) -> list[str]:
    """The held-out sites (``evaluation.loso``): what a hospital the model was not trained on may expect."""
    lines = ["## Leave one site out", ""]
    if loso.get("skipped"):
        return [*lines, f"Not run: {loso['skipped']}."]
    keys = loso.get("shown") or []
    lines += ["| held-out site | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---|" + "---|" * len(keys),
              "| (pooled test split) | " + " | ".join(fmt((loso.get("pooled") or {}).get(k)) for k in keys) + " |"]
    for site, drops in (loso.get("drops") or {}).items():
        fold = (loso.get("folds") or {}).get(site) or {}
        lines.append(f"| {site} | " + " | ".join(f"{fmt(fold.get(k))} (drop {fmt(drops.get(k))})" for k in keys) + " |")
    worst = loso.get("worst")
    verdict = "no gated figure measured" if not worst else f"{worst['metric']} at {worst['site']}, {fmt(worst['drop'])}"
    return [*lines, "", f"Worst drop of a gated figure ({', '.join(loso.get('gate_metrics') or [])}): {verdict}."]


def _limits(sites: list[str]) -> list[str]:
    return [
        "## Limits",
        "",
        f"- Trained and tested on {len(sites) or 'unknown'} site(s) ({', '.join(sites) or 'unknown'}). Other hospitals,",
        "  scanners, kernels and protocols (non-contrast, low-dose) are untested: evaluate on a new site's data first.",
        "- Thresholds were chosen on validation data for a target sensitivity; predictive values depend on prevalence.",
        "- Small test sets give wide confidence intervals (see the evaluation report); `n/a` means a metric could not",
        "  be measured (a class was absent).",
        "- Slices that ingest quarantines (not CT, lossy compression, burned-in annotation, ...) or that show no",
        "  body are not scored; a study with no scorable slice gets no decision.",
    ]


def _provenance(meta1: Mapping[str, Any], meta2: Mapping[str, Any]) -> list[str]:
    return [
        "## Provenance",
        "",
        "| | stage 1 | stage 2 |",
        "|---|---|---|",
        *(f"| {key} | `{meta1.get(key)}` | `{meta2.get(key)}` |"
          for key in ("git_commit", "config_hash", "mlflow_run_id", "package_version")),
    ]
