"""Dataset versions in MLflow: each onboarded site's data-quality report becomes a run whose input
is that site's slices at their digest, so the data a model was trained on can be traced back to
the onboarding that brought it in (and the drift it showed)."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from pe_triage.quality import flat_metrics, to_markdown
from pe_triage.tracking import Tracker, start_run

#: MLflow dataset digests are short strings; the full sha256 goes into the run's tags
_DIGEST_CHARS = 16


def datasets_experiment(experiment: str) -> str:
    """Onboarding runs live beside the training experiment, not in it: they are not comparable runs."""
    return f"{experiment}-datasets"


def log_quality_report(report: dict[str, Any], *, experiment: str, uri: str | None = None) -> str | None:
    """Log ``report`` (:func:`pe_triage.quality.site_report`) as a run of ``experiment``-datasets:
    flat metrics, digest and drift tags, the JSON and Markdown reports, and the site's partition as
    an MLflow dataset input. Returns the run id (None when no tracking URI is configured)."""
    site, version = report["site"], report["version"]
    tags = {
        "pe_triage.kind": "dataset",
        "pe_triage.site": site,
        "pe_triage.dataset_uri": report["dataset"],
        "pe_triage.dataset_digest": report["dataset_digest"],
        "pe_triage.site_digest": version["digest"],
        "pe_triage.drift_flagged": ",".join(report["drift"]["flagged"]) or "none",
        "pe_triage.version": report["pe_triage_version"],
    }
    with start_run(experiment=datasets_experiment(experiment), run_name=f"onboard {site}", tags=tags, uri=uri) as run:
        if not isinstance(run, Tracker):
            return None
        run.log_metrics(flat_metrics(report))
        _log_dataset_input(run, report)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "quality.json").write_text(json.dumps(report, indent=2))
            Path(tmp, "quality.md").write_text(to_markdown(report))
            run.log_artifacts(tmp, "quality")
        return run.run_id


def _log_dataset_input(run: Tracker, report: dict[str, Any]) -> None:
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag

    counts = {k: v for k, v in report["counts"].items() if isinstance(v, int)}
    labels = {f"slices_{k}": v for k, v in report["class_balance"]["slices"].items()}
    summary = pd.DataFrame([{"site": report["site"], **counts, **labels}])
    source = report["version"]["uri"].rstrip("/") + f"/site={report['site']}"
    with warnings.catch_warnings():  # MLflow 3 registers its local artifact source twice, and hints at integer columns
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(summary, source=source, name=f"slices:{report['site']}",
                                          digest=report["version"]["digest"][:_DIGEST_CHARS])._to_mlflow_entity()
    run.client.log_inputs(run.run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "onboarding")])])
