"""The composite two-stage model as an MLflow pyfunc.

The pyfunc owns its weights: the two stage artifact folders (state dicts + metadata), the exam
model's folder when the version carries one, and the triage configuration travel as pyfunc
artifacts and are rebuilt by :class:`pe_triage.predict.Triage`,
so any batch size works (MLflow's torch.export format would pin the example's). Nothing is pickled:
the model is logged as "models from code" (:mod:`pe_triage.registry.model_code`, which takes the
class from the installed package), so loading needs the ``pe-triage`` package installed and runs no
code from the artifact store. The version is self-contained (:mod:`pe_triage.registry.bundle`): the
package's wheel is an artifact, and ``requirements.txt`` names it by its path in the model folder
(install from there: ``cd model && pip install -r requirements.txt``) next to exact pins of every
other dependency. :func:`load_triage` does not even run the code file: it reads the artifacts that
``MLmodel`` names. A loaded model scores on the GPU when PyTorch sees one.

Input (a DataFrame, one of two forms; the signature marks every column optional):

* ``dicom_path``: DICOM files or folders (local or ``s3://``), all rows together one input;
* slices: ``study_uid``, ``series_uid``, ``slice_index``, ``rows``, ``cols``,
  ``pixel_spacing_row_mm``, ``pixel_spacing_col_mm`` and ``hu`` (int16 little-endian bytes,
  row-major) or ``hu_planes`` (a ``slices`` dataset row as stored).

Output: one row per slice, :data:`pe_triage.predict.OUTPUT_COLUMNS` (see that module). A refused
input raises an ``MlflowException`` (INVALID_PARAMETER_VALUE, HTTP 400 from MLflow's scoring server)
whose message is the :class:`PredictError`'s. ``dicom_path`` is read only under the prefixes in
:data:`ALLOWED_PREFIXES_ENV` (``serve.allowed_prefixes``; none by default).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema

from pe_triage import schema as S
from pe_triage.config import RegistryConfig, ServeConfig
from pe_triage.predict import (
    DICOM_PATH,
    EXAM_P_DISEASE,
    EXAM_P_PE,
    FLAGGED,
    HU_INPUT,
    STUDY_TRIAGE,
    TRIAGE,
    PredictError,
    Triage,
    default_device,
)
from pe_triage.registry.bundle import package_wheel, pinned_requirements
from pe_triage.registry.errors import RegistryError

STAGE1, STAGE2, TRIAGE_CONFIG, WHEEL = "stage1", "stage2", "triage", "package_wheel"
#: the exam model's artifact (only in a version that carries one)
EXAM = "exam"
#: comma-separated ``serve.allowed_prefixes`` of a process that serves this pyfunc (``mlflow models
#: serve`` reads no pe-triage configuration file)
ALLOWED_PREFIXES_ENV = "PE_TRIAGE_ALLOWED_PREFIXES"
#: the model folder's sub-folder where MLflow copies the artifacts (the wheel is named relative to it)
ARTIFACTS_DIR = "artifacts"
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
        ColSpec("double", EXAM_P_DISEASE, required=False),  # a version with an exam model only
        ColSpec("double", EXAM_P_PE, required=False),
    ]),
)


class PeTriageModel(PythonModel):
    """Both stages and the per-study rule behind one ``predict``; :attr:`triage` is the library
    object (``unwrap_python_model().triage``) for callers that want more than the DataFrame."""

    triage: Triage
    serve: ServeConfig

    def load_context(self, context: PythonModelContext) -> None:
        a = context.artifacts
        self.triage = Triage.from_config(a[STAGE1], a[STAGE2], a[TRIAGE_CONFIG], a.get(EXAM)).to(default_device())
        prefixes = [p.strip() for p in os.environ.get(ALLOWED_PREFIXES_ENV, "").split(",") if p.strip()]
        self.serve = ServeConfig(allowed_prefixes=tuple(prefixes))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return predict_frame(self.triage, model_input, self.serve.allowed_prefixes)
        except PredictError as e:
            # MLflow's scoring server answers an MlflowException with its code and message (400 here);
            # any other exception becomes a generic error with the message buried in a stack trace
            raise MlflowException.invalid_parameter_value(str(e)) from None


def predict_frame(triage: Triage, model_input: pd.DataFrame, allowed_prefixes: Sequence[str]) -> pd.DataFrame:
    """The pyfunc's input (``dicom_path`` rows, read only under ``allowed_prefixes``, or HU slice
    rows) -> one row per slice; shared by the pyfunc and ``pe-triage serve``'s ``/invocations``."""
    if DICOM_PATH in model_input.columns and model_input[DICOM_PATH].notna().any():
        if model_input[DICOM_PATH].isna().any():
            raise PredictError(f"give either {DICOM_PATH!r} on every row or slice rows, not both")
        try:
            return triage.predict_dicom(model_input[DICOM_PATH].tolist(), allowed_prefixes=allowed_prefixes)[0]
        except FileNotFoundError:
            raise PredictError(f"a {DICOM_PATH} names no file, folder or prefix") from None
    return triage.predict_slices(model_input)


def input_example(size: int = 96) -> pd.DataFrame:
    """One synthetic slice in the HU form (no patient data): a water-dense body with two lungs in air,
    enough for the crop to find a body, so MLflow's check of the example runs the whole model."""
    yy, xx = np.mgrid[:size, :size] / size
    hu = np.full((size, size), -1000, np.int16)
    hu[((xx - 0.5) / 0.45) ** 2 + ((yy - 0.5) / 0.35) ** 2 < 1] = 40
    for cx in (0.32, 0.68):
        hu[((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.22) ** 2 < 1] = -850
    return pd.DataFrame({S.STUDY_UID: ["study-1"], S.SERIES_UID: ["series-1"], S.SLICE_INDEX: [0], S.ROWS: [size],
                         S.COLS: [size], S.PIXEL_SPACING_ROW: [4.0], S.PIXEL_SPACING_COL: [4.0],
                         HU_INPUT: [hu.astype("<i2").tobytes()]})


def save_composite(path: str | Path, stage1: str | Path, stage2: str | Path, triage: Triage, *,
                   wheel: str | Path | None = None, exam: str | Path | None = None) -> Path:
    """Write the self-contained pyfunc model folder at ``path``: the stage folders ``stage1`` /
    ``stage2``, the configuration of ``triage`` (loaded from those folders, which checked that the
    pair agrees), the exam model folder ``exam`` (when ``triage`` carries it), the models-from-code
    file (no pickle), the package ``wheel`` (default: built for the
    running code, :func:`~pe_triage.registry.bundle.package_wheel`), exact requirements naming it, an
    input example and the signature."""
    if (exam is None) != (triage.exam is None):
        raise RegistryError("give the exam model folder exactly when the triage carries an exam model")
    wheel = Path(wheel) if wheel is not None else package_wheel(RegistryConfig().wheel_cache)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "triage.json"
        config.write_text(json.dumps(triage.config(), indent=2))
        artifacts = {STAGE1: str(stage1), STAGE2: str(stage2), TRIAGE_CONFIG: str(config), WHEEL: str(wheel)}
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(MODEL_CODE),
            artifacts=artifacts | ({} if exam is None else {EXAM: str(exam)}),
            signature=SIGNATURE,
            input_example=input_example(),
            # the wheel by its path in the model folder, never by name: a name would resolve on a public index
            pip_requirements=[f"{ARTIFACTS_DIR}/{wheel.name}", *pinned_requirements(wheel)],
            metadata={"pe_triage_format": triage.config()["format"]},
        )
    if not (Path(path) / ARTIFACTS_DIR / wheel.name).is_file():
        # the requirement names this path: an MLflow that lays out artifacts otherwise must fail here
        raise RegistryError(f"MLflow did not store the package wheel as {ARTIFACTS_DIR}/{wheel.name}")
    return Path(path)


def composite_artifacts(folder: str | Path) -> dict[str, Path]:
    """The artifact paths of the composite model saved in ``folder``, read from its ``MLmodel`` (YAML,
    safely): refused unless it is a models-from-code pe-triage model whose artifacts lie inside. The
    exam model's is optional (a version without one)."""
    root = Path(folder).resolve()
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        raise PredictError(f"{folder}: not an MLflow model folder (no MLmodel)")
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    code = flavor.get("model_code_path")
    if "python_model" in flavor or not code or Path(str(code)).name != MODEL_CODE.name:
        raise PredictError(f"{folder}: not a pe-triage composite model (a pickled or foreign python model)")
    found = {}
    named = flavor.get("artifacts") or {}
    for key in (STAGE1, STAGE2, TRIAGE_CONFIG, *([EXAM] if EXAM in named else [])):
        path = (root / str(named.get(key, {}).get("path", ""))).resolve()
        if path == root or not path.is_relative_to(root) or not path.exists():
            raise PredictError(f"{folder}: artifact {key!r} missing or outside the model folder")
        found[key] = path
    return found


def load_triage(folder: str | Path) -> Triage:
    """The :class:`Triage` inside a saved composite model folder, built from its artifacts (weights
    read with ``weights_only=True``); no code from the folder is run."""
    a = composite_artifacts(folder)
    return Triage.from_config(a[STAGE1], a[STAGE2], a[TRIAGE_CONFIG], a.get(EXAM))
