"""Leave-one-site-out steps (``pe_triage.evaluation.loso``): the folds of the windows, one fold
trained and evaluated on its held-out site (a GPU step, like ``train``), and the summary that
``check_gates`` and ``register`` read."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output


def loso_folds(windows: Input[Dataset], config: str, site_splits: Output[Dataset]) -> list:
    """The site folds (one per site) with their splits. With none (off, too few sites) one
    placeholder, ``""``, that ``loso_fold`` trains nothing for: kfp.local cannot collect an empty
    ``ParallelFor`` (and neither ``dsl.OneOf`` of artifacts nor a condition inside the loop runs
    there), so the loop always has an item. The reason for no folds rides in the splits' metadata
    to the summary, which records it."""
    from pe_triage.config import parse_config
    from pe_triage.evaluation.loso import site_folds
    from pe_triage.logs import setup_logging

    setup_logging()

    source = windows.metadata.get("uri") or windows.path  # a reference to the store, or the artifact
    folds, reason = site_folds(source, site_splits.path, parse_config(config))
    site_splits.metadata["skipped"] = reason
    if not folds:  # a file behind every output: kfp.local's cache skips entries without one
        with open(site_splits.path, "w") as f:
            f.write("")
    return folds or [""]


def loso_fold(windows: Input[Dataset], site_splits: Input[Dataset], fold: str, config: str, tracking_uri: str,
              evaluation: Output[Artifact]):
    """Both stages trained without site ``fold``, calibrated, evaluated on it: ``evaluation`` is the
    evaluate folder (metrics.json) the summary reads. The placeholder fold ``""`` trains nothing."""
    import logging

    from pe_triage.config import parse_config
    from pe_triage.evaluation.loso import train_fold
    from pe_triage.logs import setup_logging

    setup_logging()
    if not fold:
        with open(evaluation.path, "w") as f:  # a file behind every output (kfp.local's cache)
            f.write("")
        return
    logging.getLogger("pe_triage_components").info("site %s", fold)

    source = windows.metadata.get("uri") or windows.path
    metrics = train_fold(source, site_splits.path, fold, evaluation.path, config=parse_config(config),
                         tracking_uri=tracking_uri or None)
    evaluation.metadata.update(fold=fold, **{k: v for k, v in metrics["summary"].items() if isinstance(v, float)})


def loso_summary(evaluations: Input[list[Artifact]], pooled: Input[Artifact], site_splits: Input[Dataset], config: str,
                 tracking_uri: str, loso: Output[Artifact], report: Output[HTML], metrics: Output[Metrics]):
    """Each held-out site against the main model's pooled test evaluation (``pooled``), logged to
    MLflow; ``loso`` is the folder ``check_gates`` and ``register`` read, ``report`` the KFP UI's view."""
    import json
    import shutil

    from pe_triage.config import parse_config
    from pe_triage.evaluation.loso import WORST, summarize
    from pe_triage.logs import setup_logging

    setup_logging()

    skipped = site_splits.metadata.get("skipped", "")
    folds = [] if skipped else [e.path for e in evaluations]  # with none, the loop ran its placeholder
    summary = summarize(folds, pooled.path, loso.path, config=parse_config(config), skipped=skipped,
                        tracking_uri=tracking_uri or None)
    for site, drops in (summary.get("drops") or {}).items():
        for key, drop in drops.items():
            if drop is not None:
                metrics.log_metric(f"{site}.drop.{key}", float(drop))
    if summary[WORST] is not None:
        metrics.log_metric("worst_drop", float(summary[WORST]["drop"]))
    shutil.copyfile(f"{loso.path}/leave_one_site_out.html", report.path)
    with open(metrics.path, "w") as f:  # a file behind every output (kfp.local's cache)
        json.dump(metrics.metadata, f)
