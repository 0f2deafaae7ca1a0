"""Evaluation: metrics (per slice, per patient, cascade, per site), the report, evidence maps (integrated gradients, Grad-CAM)."""

from pe_triage.evaluation.gradcam import (
    grad_cam,
    gradcam_samples,
    gradcam_summary,
    inside_fraction,
    overlay_png,
    peak_on_lesion,
)
from pe_triage.evaluation.metrics import (
    SUMMARY_KEYS,
    cascade_labels,
    evaluate_predictions,
    format_proportion,
    leave_one_site_out_summary,
    patient_decisions,
    patient_predictions,
    proportion,
    wilson_interval,
)
from pe_triage.evaluation.report import write_report
from pe_triage.stats import auroc, average_precision

__all__ = [
    "SUMMARY_KEYS", "auroc", "average_precision", "cascade_labels", "evaluate_predictions", "format_proportion",
    "grad_cam", "gradcam_samples", "gradcam_summary", "inside_fraction", "leave_one_site_out_summary", "overlay_png",
    "patient_decisions", "patient_predictions", "peak_on_lesion", "proportion", "wilson_interval", "write_report",
]
