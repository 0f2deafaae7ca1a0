"""Model steps: train one stage (GPU image), set the cascade's operating point, train the exam model, evaluate."""

from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
    SlicedClassificationMetrics,
)


def train(windows: Input[Dataset], splits: Input[Dataset], stage: int, config: str, tracking_uri: str, model: Output[Model]):
    """Train stage 1 (WNL vs disease) or stage 2 (PE vs other) into a model artifact folder: in this
    process, or one DDP rank per GPU under torchrun where the pod has several (``launch``). Resumes
    from its checkpoint when a retry finds one: on the pod's checkpoint volume when it has one (a
    retried pod starts on an empty filesystem), else beside the artifact."""
    from pe_triage.logs import setup_logging
    from pe_triage.training.launch import train_step

    setup_logging()

    source = windows.metadata.get("uri") or windows.path  # a reference to the store, or the artifact
    meta = train_step(source, splits.path, model.path, stage=stage, config=config, tracking_uri=tracking_uri,
                      inputs=(windows.metadata.get("uri") or windows.uri, splits.uri))
    model.metadata.update(stage=stage, threshold=meta["threshold"], best_epoch=meta["best_epoch"],
                          mlflow_run_id=meta.get("mlflow_run_id") or "", **{f"val_{k}": v for k, v in meta["val"].items()})


def calibrate(stage1: Input[Model], stage2: Input[Model], windows: Input[Dataset], splits: Input[Dataset], config: str,
              calibrated_stage1: Output[Model], calibrated_stage2: Output[Model]):
    """Set the triage's operating point on the validation exams: both models, each with the
    threshold of the pair and how it was chosen (``operating_point`` in its metadata)."""
    from pe_triage.config import parse_config
    from pe_triage.evaluation.operating_point import calibrate
    from pe_triage.logs import setup_logging

    setup_logging()

    source = windows.metadata.get("uri") or windows.path  # a reference to the store, or the artifact
    record = calibrate(stage1.path, stage2.path, source, splits.path, calibrated_stage1.path, calibrated_stage2.path,
                       config=parse_config(config))
    for stage, out in ((1, calibrated_stage1), (2, calibrated_stage2)):
        out.metadata.update(stage=stage, threshold=record["thresholds"][f"stage{stage}"], operating_point=record["level"],
                            **{f"val_{k}": v for k, v in (record["achieved"] or {}).items() if isinstance(v, float)})


def train_exam(stage1: Input[Model], stage2: Input[Model], windows: Input[Dataset], splits: Input[Dataset], config: str,
               tracking_uri: str, exam: Output[Model]):
    """The exam-level model over the calibrated stages' slice embeddings, its two thresholds then set
    jointly on the validation exams as ``calibrate`` sets the stages'. With ``exam.enabled`` false,
    a marker file and ``enabled: false`` in the metadata, which evaluate and register read as no exam model."""
    import json

    from pe_triage.config import parse_config
    from pe_triage.evaluation.exam import calibrate_exam
    from pe_triage.logs import setup_logging
    from pe_triage.training.exam import train_exam

    setup_logging()

    cfg = parse_config(config)
    exam.metadata["enabled"] = cfg.exam.enabled
    if not cfg.exam.enabled:
        with open(exam.path, "w") as f:  # a file behind the output: kfp.local's cache skips entries without one
            json.dump({"enabled": False}, f)
        return
    source = windows.metadata.get("uri") or windows.path  # a reference to the store, or the artifact
    meta = train_exam(source, splits.path, stage1.path, stage2.path, exam.path, config=cfg, tracking_uri=tracking_uri or None)
    thresholds = calibrate_exam(stage1.path, stage2.path, exam.path, source, splits.path, exam.path, config=cfg)
    exam.metadata.update(thresholds=thresholds, **{k: v for k, v in meta["validation"].items() if v is not None})


def evaluate(stage1: Input[Model], stage2: Input[Model], windows: Input[Dataset], splits: Input[Dataset], config: str,
             tracking_uri: str, truth: str, evaluation: Output[Artifact], metrics: Output[Metrics],
             cascade: Output[ClassificationMetrics], per_site: Output[SlicedClassificationMetrics], report: Output[HTML],
             summary: Output[Markdown], exam: Input[Model] = None):
    """Evaluate the cascade on the test split: ``evaluation`` is the folder the registry reads
    (metrics.json, report, plots); the other outputs are the views the KFP UI renders (summary
    numbers, the per-slice 3-class cascade confusion and stage-1 ROC, the same per site). ``truth``: a
    synthetic cohort's ground-truth folder ("" for hospital data) for lesion contours and evidence-map checks.
    ``exam``: the exam model, compared with the slice rules (absent, or a disabled step's marker: none)."""
    import json
    import shutil

    from pe_triage.config import parse_config
    from pe_triage.evaluation.evaluate import evaluate
    from pe_triage.logs import setup_logging

    setup_logging()

    cfg = parse_config(config)
    source = windows.metadata.get("uri") or windows.path  # a reference to the store, or the artifact
    exam_path = exam.path if exam is not None and exam.metadata.get("enabled", True) else None
    result = evaluate(stage1.path, stage2.path, source, splits.path, evaluation.path, config=cfg, truth=truth or None,
                      tracking_uri=tracking_uri or None, exam=exam_path)
    for name, value in result["summary"].items():
        if value is not None:
            metrics.log_metric(name, float(value))
    confusion = result["slice"]["cascade"]["confusion"]
    cascade.log_confusion_matrix(confusion["labels"], confusion["matrix"])
    if roc := (result["curves"]["stage1"] or {}).get("roc"):
        cascade.log_roc_curve(roc["fpr"], roc["tpr"], roc["threshold"])
    slices = []  # SlicedClassificationMetrics' own log methods fail in kfp 2.17 (no _sliced_metrics): same schema, by hand
    for site, sub in result["per_site"].items():
        site_metrics = ClassificationMetrics()
        confusion = sub["slice"]["cascade"]["confusion"]
        site_metrics.log_confusion_matrix(confusion["labels"], confusion["matrix"])
        slices.append({"slice": site, "sliceClassificationMetrics": site_metrics.metadata})
    per_site.metadata["evaluationSlices"] = slices
    shutil.copyfile(f"{evaluation.path}/report.html", report.path)
    shutil.copyfile(f"{evaluation.path}/report.md", summary.path)
    for view in (metrics, cascade, per_site):  # a file behind every output: kfp.local's cache skips entries without one
        with open(view.path, "w") as f:
            json.dump(view.metadata, f)
