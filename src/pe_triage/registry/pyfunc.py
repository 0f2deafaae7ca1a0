"""The composite two-stage model as an MLflow pyfunc.

The pyfunc owns its weights: the two stage artifact folders (state dicts + metadata) and the
triage configuration travel as pyfunc artifacts and are rebuilt by :class:`pe_triage.predict.Triage`,
so any batch size works (MLflow's torch.export format would pin the example's). The model is
pickled by reference to this module: loading needs the ``pe-triage`` package installed (pinned in
the model's requirements), nothing else.

Input (a DataFrame, one of two forms; the signature marks every column optional):

* ``dicom_path``: DICOM files or folders (local or ``s3://``), all rows together one input;
* slices: ``study_uid``, ``series_uid``, ``slice_index``, ``rows``, ``cols``,
  ``pixel_spacing_row_mm``, ``pixel_spacing_col_mm`` and ``hu`` (int16 little-endian bytes,
  row-major) or ``hu_planes`` (a ``slices`` dataset row as stored).

Output: one row per slice, :data:`pe_triage.predict.OUTPUT_COLUMNS` (see that module).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema

from pe_triage import __version__
from pe_triage import schema as S
from pe_triage.predict import (
    DICOM_PATH,
    FLAGGED,
    HU_INPUT,
    STUDY_TRIAGE,
    TRIAGE,
    PredictError,
    Triage,
)

STAGE1, STAGE2, TRIAGE_CONFIG = "stage1", "stage2", "triage"

SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec("string", DICOM_PATH, required=False),
        ColSpec("string", S.STUDY_UID, required=False),
        ColSpec("string", S.SERIES_UID, required=False),
        ColSpec("long", S.SLICE_INDEX, required=False),
        ColSpec("long", S.ROWS, required=False),
        ColSpec("long", S.COLS, required=False),
        ColSpec("double", S.PIXEL_SPACING_ROW, required=False),
        ColSpec("double", S.PIXEL_SPACING_COL, required=False),
        ColSpec("binary", HU_INPUT, required=False),
        ColSpec("binary", S.HU, required=False),
    ]),
    outputs=Schema([
        ColSpec("string", S.STUDY_UID),
        ColSpec("string", S.SERIES_UID),
        ColSpec("long", S.SLICE_INDEX),
        ColSpec("double", S.P_DISEASE),
        ColSpec("double", S.P_PE),
        ColSpec("string", TRIAGE),
        ColSpec("boolean", FLAGGED),
        ColSpec("string", STUDY_TRIAGE),
    ]),
)


class PeTriageModel(PythonModel):
    """Both stages and the per-study rule behind one ``predict``; :attr:`triage` is the library
    object (``unwrap_python_model().triage``) for callers that want more than the DataFrame."""

    triage: Triage

    def load_context(self, context: PythonModelContext) -> None:
        a = context.artifacts
        self.triage = Triage.from_config(a[STAGE1], a[STAGE2], a[TRIAGE_CONFIG])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if DICOM_PATH in model_input.columns and model_input[DICOM_PATH].notna().any():
            if model_input[DICOM_PATH].isna().any():
                raise PredictError(f"give either {DICOM_PATH!r} on every row or slice rows, not both")
            return self.triage.predict_dicom(model_input[DICOM_PATH].tolist())[0]
        return self.triage.predict_slices(model_input)


def save_composite(path: str | Path, stage1: str | Path, stage2: str | Path, triage: Triage) -> Path:
    """Write the pyfunc model folder at ``path``: the stage folders ``stage1`` / ``stage2`` and the
    configuration of ``triage`` (loaded from those folders, which checked that the pair agrees)."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # no input example on purpose: an example would have to be a study; the signature says it all
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        config = Path(tmp) / "triage.json"
        config.write_text(json.dumps(triage.config(), indent=2))
        mlflow.pyfunc.save_model(
            str(path),
            python_model=PeTriageModel(),
            artifacts={STAGE1: str(stage1), STAGE2: str(stage2), TRIAGE_CONFIG: str(config)},
            signature=SIGNATURE,
            pip_requirements=[f"pe-triage=={__version__}"],
            metadata={"pe_triage_format": triage.config()["format"]},
        )
    return Path(path)


def load_triage(model_uri: str) -> Triage:
    """The :class:`Triage` inside a saved or registered composite model (``models:/name@alias``
    resolves against the current MLflow tracking URI)."""
    model = mlflow.pyfunc.load_model(model_uri)
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, PeTriageModel):
        raise PredictError(f"{model_uri} is not a pe-triage composite model")
    return python_model.triage
