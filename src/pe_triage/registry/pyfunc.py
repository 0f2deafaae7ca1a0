"""The composite two-stage model as an MLflow pyfunc.

The pyfunc owns its weights: the two stage artifact folders (state dicts + metadata) and the
triage configuration travel as pyfunc artifacts and are rebuilt by :class:`pe_triage.predict.Triage`,
so any batch size works (MLflow's torch.export format would pin the example's). Nothing is pickled:
the model is logged as "models from code" (:mod:`pe_triage.registry.model_code`, which takes the
class from the installed package), so loading needs the ``pe-triage`` package installed (pinned in
the model's requirements) and runs no code from the artifact store. :func:`load_triage` does not
even run that file: it reads the artifacts that ``MLmodel`` names.

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
import yaml
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
#: the models-from-code file a version records (copied into the model folder under this name)
MODEL_CODE = Path(__file__).with_name("model_code.py")

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
    """Write the pyfunc model folder at ``path``: the stage folders ``stage1`` / ``stage2``, the
    configuration of ``triage`` (loaded from those folders, which checked that the pair agrees) and
    the models-from-code file, no pickle."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # no input example on purpose: an example would have to be a study; the signature says it all
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        config = Path(tmp) / "triage.json"
        config.write_text(json.dumps(triage.config(), indent=2))
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(MODEL_CODE),
            artifacts={STAGE1: str(stage1), STAGE2: str(stage2), TRIAGE_CONFIG: str(config)},
            signature=SIGNATURE,
            pip_requirements=[f"pe-triage=={__version__}"],
            metadata={"pe_triage_format": triage.config()["format"]},
        )
    return Path(path)


def composite_artifacts(folder: str | Path) -> dict[str, Path]:
    """The artifact paths of the composite model saved in ``folder``, read from its ``MLmodel`` (YAML,
    safely): refused unless it is a models-from-code pe-triage model whose artifacts lie inside."""
    root = Path(folder).resolve()
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        raise PredictError(f"{folder}: not an MLflow model folder (no MLmodel)")
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    code = flavor.get("model_code_path")
    if "python_model" in flavor or not code or Path(str(code)).name != MODEL_CODE.name:
        raise PredictError(f"{folder}: not a pe-triage composite model (a pickled or foreign python model)")
    found = {}
    for key in (STAGE1, STAGE2, TRIAGE_CONFIG):
        path = (root / str((flavor.get("artifacts") or {}).get(key, {}).get("path", ""))).resolve()
        if path == root or not path.is_relative_to(root) or not path.exists():
            raise PredictError(f"{folder}: artifact {key!r} missing or outside the model folder")
        found[key] = path
    return found


def load_triage(folder: str | Path) -> Triage:
    """The :class:`Triage` inside a saved composite model folder, built from its artifacts (weights
    read with ``weights_only=True``); no code from the folder is run."""
    a = composite_artifacts(folder)
    return Triage.from_config(a[STAGE1], a[STAGE2], a[TRIAGE_CONFIG])
