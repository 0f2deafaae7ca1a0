"""Data steps: ingest and data quality (onboarding); dataset version, preprocess and split (retraining).

The slices dataset is a persistent store that grows site by site across onboarding runs, so it is
addressed by URI (a folder or ``s3://``) rather than created as a run's output artifact: ``ingest``
writes into it and returns a *reference* artifact (the site's ingest report, with the store URI and
site in its metadata); retraining imports the store with ``dsl.importer``. Everything made inside a
run (windows, splits, models, reports) is a typed output artifact.
"""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Output


def convert_labels(labels: str, labels_format: str, config: str) -> str:
    """The label manifest a site's ingest reads: its label input as given for ``manifest`` (or none),
    else the public set's label files converted beside themselves (``<labels>.manifest.csv``, with a
    ``.report.json`` of what did not map)."""
    from pe_triage.config import parse_config
    from pe_triage.ingest.adapters import site_manifest
    from pe_triage.logs import setup_logging

    setup_logging()

    return site_manifest(labels, labels_format, parse_config(config).labels)


def ingest(site: str, source: str, labels: str, store: str, config: str, demo_key: bool, slices: Output[Dataset]):
    """Ingest one site's DICOM export (folder or s3:// prefix) and label manifest ("" for none) into
    the slices store; idempotent, so a retried or repeated run adds only new files. The pseudonym
    key comes from PE_TRIAGE_PSEUDONYM_KEY (a Kubernetes secret); ``demo_key`` allows the public
    key, for synthetic data only."""
    import json
    import logging

    from pe_triage.config import parse_config
    from pe_triage.dicom import Pseudonymizer, load_key
    from pe_triage.ingest import ingest_site
    from pe_triage.logs import setup_logging

    setup_logging()
    logging.getLogger("pe_triage_components").info("site %s", site)  # names the step on a console (demo)

    cfg = parse_config(config)
    pseudo = Pseudonymizer(load_key(demo=demo_key), site)
    report = ingest_site(site, source, store, pseudo=pseudo, labels=labels or None, config=cfg.ingest)
    with open(slices.path, "w") as f:
        json.dump(report, f, indent=2)
    slices.metadata.update(store=store, site=site, files=report["files"], **report["dataset"])


def data_quality(slices: Input[Dataset], config: str, tracking_uri: str, report: Output[Markdown],
                 metrics: Output[Metrics], quality: Output[Artifact]):
    """Data-quality report of the ingested site (counts, quarantine reasons, HU and acquisition
    distributions, class balance, drift against the other sites), logged to MLflow as a dataset
    version of the experiment's ``-datasets`` companion."""
    import json
    import logging

    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.quality import flat_metrics, site_report, to_markdown
    from pe_triage.registry.datasets import log_quality_report

    setup_logging()
    logging.getLogger("pe_triage_components").info("site %s", slices.metadata["site"])

    cfg = parse_config(config)
    result = site_report(slices.metadata["store"], slices.metadata["site"])
    run_id = log_quality_report(result, experiment=cfg.registry.experiment, uri=tracking_uri or None)
    with open(report.path, "w") as f:
        f.write(to_markdown(result))
    with open(quality.path, "w") as f:
        json.dump(result, f, indent=2)
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)
    quality.metadata.update(site=result["site"], digest=result["version"]["digest"], drift=result["drift"]["flagged"],
                            mlflow_run_id=run_id or "")


def dataset_version(store: str) -> str:
    """Digest of the slices store now (Parquet footers only). Never cached: the store grows under
    the same URI, and this digest is what makes the steps after it cache on the data they read."""
    from pe_triage.logs import setup_logging
    from pe_triage.quality import dataset_version

    setup_logging()

    return dataset_version(store)["digest"]


def preprocess(slices: Input[Dataset], slices_digest: str, config: str, windows: Output[Dataset]):
    """slices -> windows (HU windows, lung crop, resize). ``slices_digest`` is the store version
    being read: part of the cache key, and recorded on the windows for lineage."""
    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.preprocess import preprocess

    setup_logging()

    cfg = parse_config(config)
    report = preprocess(slices.path, windows.path, config=cfg.preprocess)
    windows.metadata.update(slices_digest=slices_digest, windows=report["windows"], size=report["size"],
                            series=report["series"]["total"], labels=report["labels_written"])


def split(windows: Input[Dataset], config: str, splits: Output[Dataset]):
    """Patient-level train/val/test splits, stratified by site and patient class."""
    from pe_triage.config import parse_config
    from pe_triage.logs import setup_logging
    from pe_triage.splits import split_dataset

    setup_logging()

    cfg = parse_config(config)
    source = windows.metadata.get("uri") or windows.path  # a reference to the store, or the artifact
    report = split_dataset(source, splits.path, config=cfg.split)
    splits.metadata.update(patients=report["patients"], excluded=len(report["excluded"]), warnings=report["warnings"])
