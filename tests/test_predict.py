"""Triage of a study: DICOM and HU-slice input give the training path's probabilities, one decision
per study, the evaluation's patient rule, clear errors on unusable input, no PHI in the report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch
from factories import ct_slice, pseudo, write

from pe_triage import schema as S
from pe_triage.artifact import StageModel, load_model, save_model
from pe_triage.config import IngestConfig, ModelConfig, PreprocessConfig, SynthConfig, to_dict
from pe_triage.ingest import ingest_site
from pe_triage.models import build_model
from pe_triage.predict import (
    DecisionRule,
    PredictError,
    Triage,
    study_decisions,
    triage_report,
)
from pe_triage.preprocess import preprocess, resolve_windows
from pe_triage.synth import generate_cohort

#: small crops keep the CPU models fast; 96 px synthetic slices keep ingest fast
PRE = PreprocessConfig(size=32)
STAGE_WINDOWS = {1: ("vascular", "lung"), 2: ("lung", "mediastinal")}  # different subsets: the union is needed
DATA = {"windows_digest": "wd-1", "splits_digest": "sd-1", "fold": "default", "sites": ["site-a", "site-b"]}


def stage_model(out: Path, stage: int, *, windows: tuple[str, ...] | None = None, threshold: float = 0.5, seed: int = 0,
                preprocess: PreprocessConfig = PRE, data: dict | None = None, context: int = 0) -> Path:
    """A tiny randomly initialised stage model artifact, as the trainer writes it."""
    torch.manual_seed(seed * 10 + stage)
    model_config = ModelConfig(arch="cbam_drn_d_22", width=0.125, context=context)
    names = windows or STAGE_WINDOWS[stage]
    defs = [w.to_dict() for w in resolve_windows(PreprocessConfig(windows=names))]
    meta = {
        "stage": stage, "model": to_dict(model_config), "windows": defs, "threshold": threshold,
        "target_sensitivity": 0.95, "val": {"auroc": 0.9}, "preprocess": to_dict(preprocess) | {"workers": None},
        "data": data or DATA, "git_commit": f"commit-{seed}", "config_hash": f"hash-{seed}", "mlflow_run_id": None,
        "package_version": "0.1.0",
    }
    return save_model(out, build_model(model_config, len(names)).eval(), meta, history=[])


def edited(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of a stage artifact with metadata changed (same weights)."""
    model = load_model(src)
    return save_model(dst, model.model, {**model.meta.raw, **changes}, history=[])


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic patients (one study each) of one site: DICOM as a hospital writes it."""
    root = tmp_path_factory.mktemp("predict-cohort")
    generate_cohort(root, SynthConfig(sites=1, patients_per_site=2, slices=10, size=96, seed=11))
    return root


def study_dir(cohort: Path, patient: str = "P0001") -> Path:
    return cohort / "sites" / "site-a" / "dicom" / patient


def reference(stage_pair: tuple[Path, Path], dicom: Path, work: Path) -> tuple[pd.DataFrame, Path]:
    """The training path, stage by stage: ingest, a windows dataset with the stage's own windows,
    each slice's windows with its neighbours' for a 2.5-D model (window-major, ends replicated, built
    by hand), StageModel.predict_proba; (per-slice probabilities by slice_index, slices dataset)."""
    slices = work / "slices"
    ingest_site("site-a", str(dicom), str(slices), pseudo=pseudo("site-a"), config=IngestConfig(workers=1))
    out = {}
    for stage, path in enumerate(stage_pair, start=1):
        model = load_model(path)
        out[S.SLICE_INDEX], x = stage_inputs(model, slices, work / f"windows-{stage}")
        out[f"p{stage}"] = model.predict_proba(x)
    return pd.DataFrame(out), slices


def stage_inputs(model: StageModel, slices: Path, windows: Path) -> tuple[np.ndarray, np.ndarray]:
    """(slice indices, the model's uint8 inputs) of the ingested ``slices`` by the training path: a
    windows dataset with the model's own windows, each slice with its neighbours for a 2.5-D model
    (window-major, ends replicated, built by hand)."""
    preprocess(str(slices), str(windows), config=replace(PRE, windows=tuple(model.meta.window_names), workers=1))
    table = pads.dataset(windows, format="parquet", partitioning="hive").to_table().sort_by(S.SLICE_INDEX)
    stack = S.windows_stack(table[S.WINDOWS], S.windows_shape(table.schema.field(S.WINDOWS)))
    k, n = model.meta.model.context, len(stack)
    rows = np.clip(np.arange(n)[:, None] + np.arange(-k, k + 1)[None, :], 0, n - 1)
    x = np.stack([stack[r] for r in rows]).transpose(0, 2, 1, 3, 4).reshape(n, -1, *stack.shape[-2:])
    return table[S.SLICE_INDEX].to_numpy(), x


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, cohort: Path) -> tuple[tuple[Path, Path], pd.DataFrame, Path]:
    """A stage pair whose thresholds split the study's slices (every label occurs), the training
    path's probabilities on P0001 and its slices dataset."""
    root = tmp_path_factory.mktemp("predict-models")
    pair = stage_model(root / "stage1", 1), stage_model(root / "stage2", 2)
    ref, slices = reference(pair, study_dir(cohort), root / "reference")
    edited(pair[0], pair[0], threshold=float(np.quantile(ref["p1"], 0.3)))
    edited(pair[1], pair[1], threshold=float(np.quantile(ref["p2"], 0.5)))
    return pair, ref, slices


@pytest.fixture(scope="session")
def triage(trained: tuple[tuple[Path, Path], pd.DataFrame, Path]) -> Triage:
    return Triage.load(*trained[0])


@pytest.fixture(scope="session")
def study_prediction(triage: Triage, cohort: Path) -> tuple[pd.DataFrame, dict]:
    return triage.predict_dicom(str(study_dir(cohort)))


def test_dicom_input_gives_the_training_path_probabilities(triage: Triage, trained: tuple, study_prediction: tuple) -> None:
    ref = trained[1]
    frame, summary = study_prediction
    assert summary["files"]["ingested"] == 10 and summary["files"]["quarantined"] == 0
    assert list(frame["slice_index"]) == list(ref["slice_index"])
    np.testing.assert_allclose(frame["p_disease"], ref["p1"], atol=1e-5)
    np.testing.assert_allclose(frame["p_pe"], ref["p2"], atol=1e-5)
    t1, t2 = triage.stage1.meta.threshold, triage.stage2.meta.threshold
    expected = np.where(frame["p_disease"] < t1, "wnl", np.where(frame["p_pe"] >= t2, "pe", "other"))
    assert list(frame["triage"]) == list(expected)
    assert list(frame["flagged"]) == list(expected == "pe")
    assert set(frame["study_uid"]) == {"study-1"} and set(frame["series_uid"]) == {"series-1"}


def test_slice_input_matches_dicom_input_at_any_batch_size(triage: Triage, trained: tuple, study_prediction: tuple) -> None:
    rows = pads.dataset(trained[2], format="parquet", partitioning="hive").to_table().to_pandas()
    rows = rows.sample(frac=1.0, random_state=0).reset_index(drop=True)  # output follows the input order
    expected = study_prediction[0].set_index("slice_index")

    # plain int16 bytes (hu_planes, as a slices dataset stores them, goes through the registry test)
    plain = rows.drop(columns=[S.HU]).assign(hu=[S.decode_hu(r[S.HU], r[S.ROWS], r[S.COLS]).astype("<i2").tobytes()
                                                 for r in rows.to_dict("records")])
    out = triage.predict_slices(plain)
    assert list(out["slice_index"]) == list(rows[S.SLICE_INDEX])
    np.testing.assert_allclose(out["p_disease"], expected.loc[out["slice_index"], "p_disease"], atol=1e-5)
    np.testing.assert_allclose(out["p_pe"], expected.loc[out["slice_index"], "p_pe"], atol=1e-5)
    one = triage.predict_slices(plain.iloc[[3]])
    assert one["p_disease"].iloc[0] == pytest.approx(out["p_disease"].iloc[3], abs=1e-5)


def test_unscorable_slices_are_marked_and_missing_columns_named(triage: Triage) -> None:
    air = np.full((96, 96), -1000, np.int16)
    rows = pd.DataFrame([{"study_uid": "a", "series_uid": "b", "slice_index": 0, "rows": 96, "cols": 96,
                          "pixel_spacing_row_mm": 0.7, "pixel_spacing_col_mm": 0.7, "hu": air.tobytes()}])
    out = triage.predict_slices(rows)
    assert out["triage"].iloc[0] == "skipped" and np.isnan(out["p_disease"].iloc[0])
    assert out["study_triage"].iloc[0] == "skipped"
    with pytest.raises(PredictError, match="pixel_spacing_row_mm"):
        triage.predict_slices(rows.drop(columns=["pixel_spacing_row_mm"]))


def test_several_studies_give_one_decision_each(triage: Triage, cohort: Path) -> None:
    frame, _ = triage.predict_dicom(str(cohort / "sites" / "site-a" / "dicom"))
    assert sorted(frame["study_uid"].unique()) == ["study-1", "study-2"]
    decisions = study_decisions(frame, triage).set_index("study_uid")
    for study, rows in frame.groupby("study_uid"):
        assert set(rows["study_triage"]) == {decisions.loc[study, "triage"]}
    report = triage_report(frame, triage, model="test")
    assert [s["study"] for s in report["studies"]] == ["study-1", "study-2"]
    assert all(s["slices"] == 10 for s in report["studies"])
    # numbering does not depend on the random pseudonym key: a second call agrees
    again, _ = triage.predict_dicom(str(cohort / "sites" / "site-a" / "dicom"))
    pd.testing.assert_frame_equal(frame, again)


def test_report_holds_no_phi(triage: Triage, cohort: Path) -> None:
    files = sorted(study_dir(cohort, "P0002").rglob("*.dcm"))
    frame, summary = triage.predict_dicom([str(f) for f in files])  # single files work too
    blob = json.dumps(triage_report(frame, triage, model="models:/pe-triage@champion", input_summary=summary))
    phi = json.loads((cohort / "truth" / "phi.json").read_text())
    needles = {s for s in phi["strings"] + phi["uids"] if len(s) >= 6}
    assert len(needles) > 20
    assert not [n for n in needles if n in blob or n.upper() in blob]
    assert "P0002" not in blob and "pt-" not in blob and "st-" not in blob  # neither clear names nor pseudonyms


def test_patient_rule_is_the_evaluations(triage: Triage) -> None:
    t1, t2 = triage.stage1.meta.threshold, triage.stage2.meta.threshold
    hi1, lo1, hi2 = min(1.0, t1 + 1e-3), max(0.0, t1 - 1e-3), min(1.0, t2 + 1e-3)
    frame = pd.DataFrame({"study_uid": "s", "series_uid": "x", "slice_index": range(5),
                          "p_disease": [hi1, lo1, hi1, lo1, lo1], "p_pe": [hi2] * 5})
    assert study_decisions(frame, triage)["triage"].iloc[0] == "pe"  # any positive slice
    k2 = replace(triage, rule=DecisionRule("k_consecutive", 2))
    assert study_decisions(frame, k2)["triage"].iloc[0] == "wnl"  # no two adjacent disease slices
    frame.loc[1, "p_disease"] = hi1
    assert study_decisions(frame, k2)["triage"].iloc[0] == "pe"
    with pytest.raises(PredictError, match="rule"):
        DecisionRule("majority")


def test_input_without_ct_is_a_clear_error(triage: Triage, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="no CT slices"):
        triage.predict_dicom(str(tmp_path / "empty"))
    (tmp_path / "other" / "notes.txt").parent.mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not DICOM" * 50)
    write(ct_slice(modality="MR", size=96), tmp_path / "other" / "mr.dcm")
    with pytest.raises(PredictError, match=r"2 file\(s\) seen, 2 quarantined"):
        triage.predict_dicom(str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError):
        triage.predict_dicom(str(tmp_path / "missing"))


def test_an_inconsistent_pair_is_refused(trained: tuple, tmp_path: Path) -> None:
    s1, s2 = trained[0]
    bigger = edited(s2, tmp_path / "bigger", preprocess=to_dict(replace(PRE, size=48)))
    with pytest.raises(PredictError, match="size"):
        Triage.load(s1, bigger)
    with pytest.raises(PredictError, match="stage 1 and a stage 2"):
        Triage.load(s1, s1)
    other_lung = [{"name": "lung", "lo": -1000.0, "hi": 1600.0}, {"name": "mediastinal", "lo": 40.0, "hi": 400.0}]
    with pytest.raises(PredictError, match="window 'lung' differs"):
        Triage.load(s1, edited(s2, tmp_path / "lung", windows=other_lung))


def test_a_2_5d_pair_reads_each_slice_with_its_neighbours_in_any_input_order(cohort: Path, tmp_path: Path) -> None:
    """Stage 1 with one neighbour on each side, stage 2 with two: the DICOM path and shuffled HU rows
    both give what the models return on the windows stacked along z by slice_index, ends replicated."""
    pair = stage_model(tmp_path / "s1", 1, context=1), stage_model(tmp_path / "s2", 2, context=2)
    triage = Triage.load(*pair)
    frame, _ = triage.predict_dicom(str(study_dir(cohort)))
    ref, slices = reference(pair, study_dir(cohort), tmp_path / "ref")
    assert list(frame["slice_index"]) == list(ref["slice_index"])
    np.testing.assert_allclose(frame["p_disease"], ref["p1"], atol=1e-5)
    np.testing.assert_allclose(frame["p_pe"], ref["p2"], atol=1e-5)
    flat = reference(tuple(stage_model(tmp_path / f"flat{s}", s) for s in (1, 2)), study_dir(cohort), tmp_path / "flat")[0]
    assert not np.allclose(ref["p1"], flat["p1"], atol=1e-3)  # the neighbours do reach the model
    rows = pads.dataset(slices, format="parquet", partitioning="hive").to_table().to_pandas()
    rows = rows.sample(frac=1.0, random_state=1).reset_index(drop=True)
    out = triage.predict_slices(rows.drop(columns=[S.HU]).assign(
        hu=[S.decode_hu(r[S.HU], r[S.ROWS], r[S.COLS]).astype("<i2").tobytes() for r in rows.to_dict("records")]))
    by_index = ref.set_index("slice_index")
    np.testing.assert_allclose(out["p_disease"], by_index.loc[out["slice_index"], "p1"], atol=1e-5)
    np.testing.assert_allclose(out["p_pe"], by_index.loc[out["slice_index"], "p2"], atol=1e-5)

