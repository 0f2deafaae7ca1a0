"""Fixtures of the registry tests: a registered model of its own per test, one stage pair and one
synthetic DICOM study per module (the MLflow server itself is the session's, ``mlflow_fixtures``)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from test_predict import stage_model

from pe_triage.config import RegistryConfig, SynthConfig
from pe_triage.synth import generate_cohort


@pytest.fixture
def cfg() -> RegistryConfig:
    """A model of its own per test: the server is shared by the session."""
    name = f"pe-triage-{uuid.uuid4().hex[:8]}"
    return RegistryConfig(model_name=name, experiment=name)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("registry-models")
    # stage 1 reads a neighbouring slice on each side (2.5-D): the registry and every load path carry it
    return (str(stage_model(root / "stage1", 1, threshold=0.45, context=1)),
            str(stage_model(root / "stage2", 2, threshold=0.5)))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry-cohort")
    generate_cohort(root, SynthConfig(sites=1, patients_per_site=1, slices=8, size=96, seed=5))
    return root / "sites" / "site-a" / "dicom"
