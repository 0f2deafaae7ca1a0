"""Predict with an exam-level model (issue 21, item 3): HU slices in any order give each study the
exam probabilities of its DICOM input, a study triaged series by series (PACS) is one exam, the rule
"exam" decides the study and its SR, monitoring records carry the exam probabilities, and a model
without an exam model answers exactly as before."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pydicom
import pytest
import torch
from factories import pseudo
from test_predict import stage_model

from pe_triage import schema as S
from pe_triage.artifact import load_model
from pe_triage.config import ExamArch, IngestConfig, PacsConfig, SynthConfig
from pe_triage.evaluation.metrics import cascade_labels
from pe_triage.ingest import ingest_site
from pe_triage.models.exam import ExamNet, save_exam_model
from pe_triage.monitoring import MonitorStore, study_records
from pe_triage.pacs import triage_folder
from pe_triage.predict import (
    EXAM_P_DISEASE,
    EXAM_P_PE,
    OUTPUT_COLUMNS,
    DecisionRule,
    PredictError,
    Triage,
    triage_report,
)
from pe_triage.provenance import file_digest
from pe_triage.synth import generate_cohort

INGEST = IngestConfig(workers=1)
PACS = PacsConfig(uid_root="1.2.826.0.1.3680043.10.1234.", disclaimer="TEST DISCLAIMER: not for diagnosis")
HU_COLUMNS = [S.STUDY_UID, S.SERIES_UID, S.SLICE_INDEX, S.ROWS, S.COLS, S.PIXEL_SPACING_ROW, S.PIXEL_SPACING_COL, S.HU]


def exam_folder(out: Path, pair: tuple[Path, Path], arch: ExamArch) -> Path:
    """A randomly initialised exam model over every feature of both stages, recorded as trained on ``pair``."""
    width = sum(int(load_model(p).model.head.in_features) + 1 for p in pair)  # embeddings and logit per stage
    torch.manual_seed(7)
    stages = {str(n): {"weights": file_digest(p / "model.pt")} for n, p in enumerate(pair, start=1)}
    return save_exam_model(out, ExamNet(width, arch=arch, hidden=8),
                           {"thresholds": {"disease": 0.5, "pe": 0.5}, "features": "all", "stages": stages})


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("exam-predict-models")
    return stage_model(root / "stage1", 1, context=1), stage_model(root / "stage2", 2)


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two synthetic patients' DICOM folders (one study, one series each)."""
    root = tmp_path_factory.mktemp("exam-predict-cohort")
    generate_cohort(root, SynthConfig(sites=1, patients_per_site=2, slices=8, size=96, seed=3))
    return sorted((root / "sites" / "site-a" / "dicom").iterdir())


def hu_rows(folder: Path, work: Path) -> pd.DataFrame:
    ingest_site("site-a", str(folder), str(work), pseudo=pseudo("site-a"), config=INGEST)
    return pads.dataset(work, format="parquet", partitioning="hive").to_table().to_pandas()[HU_COLUMNS]


def test_hu_slices_in_any_order_give_each_study_its_dicom_exam_probabilities(pair: tuple[Path, Path], patients: list[Path],
                                                                             tmp_path: Path) -> None:
    triage = Triage.load(*pair, exam=exam_folder(tmp_path / "exam", pair, "gru"))
    by_dicom = [triage.predict_dicom(str(p))[0][[EXAM_P_DISEASE, EXAM_P_PE]].iloc[0].to_numpy() for p in patients]
    assert np.abs(by_dicom[0] - by_dicom[1]).max() > 1e-4  # the two studies are told apart
    rows = [hu_rows(p, tmp_path / f"slices-{i}") for i, p in enumerate(patients)]
    shuffled = pd.concat(rows, ignore_index=True).sample(frac=1, random_state=0).reset_index(drop=True)
    got = triage.predict_slices(shuffled)
    for study, expected in zip((r[S.STUDY_UID].iloc[0] for r in rows), by_dicom, strict=True):
        exam = got.loc[got[S.STUDY_UID] == study, [EXAM_P_DISEASE, EXAM_P_PE]].to_numpy()
        np.testing.assert_allclose(exam, np.broadcast_to(expected, exam.shape), atol=1e-5)
    plain = Triage.load(*pair).predict_slices(shuffled)  # the same forward pass gives the same slice scores
    np.testing.assert_allclose(got[[S.P_DISEASE, S.P_PE]], plain[[S.P_DISEASE, S.P_PE]], atol=1e-6)
    assert list(got[S.STUDY_UID]) == list(shuffled[S.STUDY_UID])


def one_study(patients: list[Path], out: Path) -> None:
    """The patients' series as the series of one study (the first one's), as a PACS sends a study."""
    uid = pydicom.dcmread(next(f for f in sorted(patients[0].rglob("*")) if f.is_file())).StudyInstanceUID
    for i, folder in enumerate(patients):
        for n, path in enumerate(f for f in sorted(folder.rglob("*")) if f.is_file()):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = uid
            (out / str(i)).mkdir(parents=True, exist_ok=True)
            ds.save_as(out / str(i) / f"{n:04d}.dcm")


def test_a_study_triaged_series_by_series_is_one_exam_and_the_exam_rule_decides_it(
        pair: tuple[Path, Path], patients: list[Path], tmp_path: Path) -> None:
    """Attention pooling ignores the order of the slices, so the exam over both series is known."""
    triage = Triage.load(*pair, exam=exam_folder(tmp_path / "exam", pair, "attention"))
    assert triage.exam is not None
    features = []
    for p in patients:
        inputs = triage.score_dicom(str(p)).inputs
        assert inputs.features is not None
        features.append(inputs.features[inputs.rows])
    expected = triage.exam.predict_proba([np.concatenate(features)])[0]
    one_study(patients, tmp_path / "study")
    t = triage.exam.thresholds
    says = str(cascade_labels(expected[:1], expected[1:], t["disease"], t["pe"])[0])
    by_exam = replace(triage, rule=DecisionRule("exam"))
    result = triage_folder(tmp_path / "study", by_exam, model="pe-triage", version="3", ingest=INGEST, config=PACS)
    (study,) = result.report["studies"]
    assert study["exam"][S.P_DISEASE] == pytest.approx(expected[0], abs=1e-5)
    assert study["exam"][S.P_PE] == pytest.approx(expected[1], abs=1e-5)
    assert len(study["series"]) == 2 and study["triage"] == says and study["decided_by"] == "exam_model"
    (record,) = study_records(result.report, site="north", source="listen")
    assert record["exam_p_pe"] == pytest.approx(expected[1], abs=1e-5) and record["study_triage"] == says


def test_monitoring_records_carry_the_exam_probabilities_and_a_plain_model_answers_as_before(
        pair: tuple[Path, Path], patients: list[Path], tmp_path: Path) -> None:
    triage = Triage.load(*pair, exam=exam_folder(tmp_path / "exam", pair, "gru"))
    frame, summary = triage.predict_dicom(str(patients[0]))
    report = triage_report(frame, triage, model="models:/pe-triage@champion", input_summary=summary)
    assert report["exam_model"]["thresholds"] == {"disease": 0.5, "pe": 0.5}
    store = MonitorStore(str(tmp_path / "store"))
    store.append(study_records(report, site="north", source="predict"))
    plain = Triage.load(*pair)
    plain_frame, plain_summary = plain.predict_dicom(str(patients[0]))
    plain_report = triage_report(plain_frame, plain, model="models:/pe-triage@champion", input_summary=plain_summary)
    store.append(study_records(plain_report, site="north", source="predict"))
    records = store.read()
    assert records["exam_p_disease"].iloc[0] == pytest.approx(frame[EXAM_P_DISEASE].iloc[0], abs=1e-6)
    assert records["exam_p_pe"].isna().tolist() == [False, True]
    assert list(plain_frame.columns) == OUTPUT_COLUMNS
    assert set(plain_report) == {"model", "rule", "thresholds", "input", "studies"}
    assert not {"exam", "decided_by"} & set(plain_report["studies"][0])
    assert plain_report["studies"][0]["triage"] == report["studies"][0]["triage"]  # rule "any": the slice rule decides


def test_an_exam_model_of_other_stage_models_is_refused_at_load(pair: tuple[Path, Path], tmp_path: Path) -> None:
    exam = exam_folder(tmp_path / "exam", pair, "gru")
    other = stage_model(tmp_path / "other-stage2", 2, seed=4)
    with pytest.raises(PredictError, match="another stage 2 model"):
        Triage.load(pair[0], other, exam=exam)
