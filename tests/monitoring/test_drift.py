"""``pe-triage monitor``: a site whose studies come from another scanner convention (manufacturer,
kernel, pixel spacing) with shifted scores is flagged, an unchanged one is not; the HTML/JSON report,
the MLflow run (real server) and the exit codes (0 within thresholds, 3 drift, 2 bad input)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pe_triage import schema as S
from pe_triage.cli import main
from pe_triage.config import MonitorConfig
from pe_triage.monitoring import MonitorStore
from pe_triage.monitoring.drift import drift_report, reference_acquisition

N = 200  # studies per group: PSI's sampling noise on deciles is ~9 * 2 / N = 0.09, well under 0.25
HISTORY, WINDOW = datetime(2026, 10, 1, 12, tzinfo=UTC), datetime(2026, 11, 2, 12, tzinfo=UTC)


def acquisition(rng: np.random.Generator, n: int, shifted: bool) -> dict[str, list]:
    vendor = rng.integers(0, 2, n)
    return {S.MANUFACTURER: ["CANON" if shifted else ("SIEMENS", "GE")[v] for v in vendor],
            S.KERNEL: ["FC52" if shifted else ("B30f", "STANDARD")[v] for v in vendor],
            S.KVP: list(rng.choice([100.0, 120.0], n)),
            S.PIXEL_SPACING_ROW: list(rng.uniform(0.9, 1.0, n) if shifted else rng.uniform(0.6, 0.8, n)),
            S.SLICE_THICKNESS: list(rng.choice([1.0, 1.25], n))}


def records(site: str, when: datetime, seed: int, *, shifted: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    p_pe = rng.beta(5, 2, N) if shifted else rng.beta(2, 5, N)
    triage = ["pe" if i % (2 if shifted else 10) == 0 else "wnl" for i in range(N)]
    cols = acquisition(rng, N, shifted)
    return [{"time": when, "site": site, "source": "test", "model": "pe-triage", "model_version": "3",
             **{k: v[i] for k, v in cols.items()}, "n_slices": 100, "n_scored": 100, "flagged_slices": 0,
             "study_triage": triage[i], "p_disease_max": float(min(1.0, p_pe[i] + 0.1)), "p_pe_max": float(p_pe[i]),
             "p_pe_mean": float(p_pe[i] / 2), "quarantine": "{}"} for i in range(N)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slices-like dataset (the columns the report reads) of the training studies, 3 slices each."""
    root = tmp_path_factory.mktemp("reference") / "slices"
    cols = acquisition(np.random.default_rng(1), N, False)
    frame = pd.DataFrame({S.STUDY_UID: [f"study-{i}" for i in range(N)], **cols}).loc[lambda f: f.index.repeat(3)]
    (root / "site=a").mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), root / "site=a" / "part-0.parquet")
    return root


@pytest.fixture
def store(tmp_path: Path) -> MonitorStore:
    store = MonitorStore(str(tmp_path / "store"))
    store.append(records("north", HISTORY, 2))
    store.append(records("north", WINDOW, 3))
    return store


def monitor(store: MonitorStore, reference: Path, out: Path, *extra: str) -> int:
    return main(["monitor", "--since", "2026-11-01", "--reference", str(reference), "--store", store.loc.uri,
                 "--out", str(out), *extra])


def test_a_shifted_site_is_flagged_and_an_unchanged_one_is_not(store: MonitorStore, reference: Path) -> None:
    store.append(records("south", WINDOW, 4, shifted=True))
    report = drift_report(store.read(date(2026, 11, 1)), store.read(until=date(2026, 10, 31)),
                          reference_acquisition(str(reference)), MonitorConfig(), since=date(2026, 11, 1), until=None)
    north, south = report["sites"]["north"], report["sites"]["south"]
    assert north["flagged"] == [] and north["output"]["reference"] == "site"
    assert {S.MANUFACTURER, S.KERNEL, S.PIXEL_SPACING_ROW} <= set(south["flagged"])
    assert {"p_pe_max", "flag_rate"} <= set(south["flagged"]) and south["output"]["reference"] == "all sites"
    assert south["input"][S.KERNEL]["psi"] > 5 * north["input"][S.KERNEL]["psi"] + 0.25
    assert south["output"]["features"]["flag_rate"]["value"] == 0.5 and report["drift"] is True


def test_the_command_exits_0_without_drift_and_3_with_it(store: MonitorStore, reference: Path, tmp_path: Path,
                                                          mlflow_server: str, capsys: pytest.CaptureFixture) -> None:
    assert monitor(store, reference, tmp_path / "calm") == 0
    assert json.loads(capsys.readouterr().out)["sites"] == {"north": []}
    store.append(records("south", WINDOW, 4, shifted=True))
    experiment = f"drift-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "config.yaml"
    config.write_text(f"registry:\n  experiment: {experiment}\n")
    assert monitor(store, reference, tmp_path / "drift", "--tracking-uri", mlflow_server, "--config", str(config)) == 3
    html = (tmp_path / "drift" / "drift.html").read_text()
    assert "Site south" in html and "data:image/png;base64," in html
    assert json.loads((tmp_path / "drift" / "drift.json").read_text())["sites"]["south"]["flagged"]
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.data.metrics["drift"] == 1.0 and run.data.metrics["south.input.kernel.psi"] > 0.25
    assert {a.path for a in client.list_artifacts(run.info.run_id, "drift")} >= {"drift/drift.html", "drift/drift.json"}


@pytest.mark.parametrize("case", ["empty period", "no reference", "windows reference", "until before since"])
def test_bad_input_exits_2(case: str, store: MonitorStore, reference: Path, tmp_path: Path) -> None:
    windows = tmp_path / "windows" / "site=a"
    windows.mkdir(parents=True)
    pq.write_table(pa.table({S.STUDY_UID: ["s"], "windows": [b"x"]}), windows / "part-0.parquet")
    args = {"empty period": ("--until", "2026-11-01"), "no reference": (), "windows reference": (),
            "until before since": ("--until", "2026-10-01")}[case]
    ref = {"no reference": tmp_path / "missing", "windows reference": tmp_path / "windows"}.get(case, reference)
    assert monitor(store, ref, tmp_path / "out", *args) == 2
