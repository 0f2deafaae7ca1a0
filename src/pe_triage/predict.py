"""Triage: both stage models in cascade, on HU slices or straight from a DICOM study.

The math is the training path's, so a deployed model sees what it was trained and evaluated on:
DICOM goes through :func:`pe_triage.ingest.ingest_site` and :func:`pe_triage.preprocess.preprocess`
(into a temporary folder), HU slices through the functions ``preprocess`` applies per series and
slice (``too_small``, ``series_box``, ``window_slice``), each stage picks its windows by name, and
the per-study decision is :func:`pe_triage.evaluation.metrics.patient_decisions` with the rule
the metrics were computed with. No mlflow here: ``pe_triage.registry.pyfunc`` wraps :class:`Triage`.

Output: one row per slice (:data:`OUTPUT_COLUMNS`): ``p_disease`` (stage 1), ``p_pe`` (stage 2, on
every slice, as in evaluation), ``triage`` (``wnl`` | ``other`` | ``pe``; ``skipped`` when the slice
cannot be scored: too small, or no body), ``flagged`` (triage is ``pe``) and ``study_triage`` (the
patient rule over the study's slices, repeated on each of its rows). A model version that carries an
exam-level model (``models.exam``) adds ``exam_p_disease`` and ``exam_p_pe`` (its per-study
probabilities, repeated on each row); its slice embeddings come from the same forward pass as the
slice scores. With the rule ``"exam"`` the study's triage is the exam model's at its thresholds.

Privacy: DICOM input is pseudonymised with a fresh random key per call, and the output names
studies and series by ordinals (``study-1``, ``series-1``), so nothing in it links to the patient.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pe_triage import schema as S
from pe_triage.artifact import ModelMeta, StageModel, load_model
from pe_triage.config import EvalConfig, IngestConfig, PreprocessConfig, StudyRule, WindowConfig, from_dict
from pe_triage.dicom import Pseudonymizer
from pe_triage.evaluation.exam import check_pair
from pe_triage.evaluation.gradcam import Attribution
from pe_triage.evaluation.metrics import RULES, cascade_labels, patient_decisions
from pe_triage.evaluation.scoring import EvaluationError
from pe_triage.hu_summary import summarise
from pe_triage.ingest import ingest_site
from pe_triage.lung_crop import Box, NoBodyError
from pe_triage.models.exam import ExamArtifactError, ExamModel, load_exam_model, slice_features
from pe_triage.preprocess import preprocess, resolve_windows, series_box, too_small, window_slice
from pe_triage.storage import location
from pe_triage.training.exam import feature_columns
from pe_triage.windows import Window, context_stack, neighbour_rows, uint8_to_centred, window_channels

FORMAT = "pe-triage-triage/1"
#: HU input: int16 little-endian, row-major (what ``array.astype("<i2").tobytes()`` gives)
HU_INPUT = "hu"
DICOM_PATH = "dicom_path"
TRIAGE, FLAGGED, STUDY_TRIAGE = "triage", "flagged", "study_triage"
#: the exam model's per-study probabilities (output columns of a version that carries one)
EXAM_P_DISEASE, EXAM_P_PE = "exam_p_disease", "exam_p_pe"
EXAM_RULE = "exam"
SKIPPED = "skipped"
KEY_COLUMNS = [S.STUDY_UID, S.SERIES_UID, S.SLICE_INDEX]
SLICE_INPUT_COLUMNS = [*KEY_COLUMNS, S.ROWS, S.COLS, S.PIXEL_SPACING_ROW, S.PIXEL_SPACING_COL]
OUTPUT_COLUMNS = [*KEY_COLUMNS, S.P_DISEASE, S.P_PE, TRIAGE, FLAGGED, STUDY_TRIAGE]
_SITE = "predict"  # the temporary dataset's site name (never in the output)
_CONTENT = "_content"  # a hash of each slice's windows: orders studies whatever the random key
_ROW = "_row"  # a slice's row in the window stack, through the reordering of the output
_CROP = [S.CROP_Y0, S.CROP_Y1, S.CROP_X0, S.CROP_X1]
#: preprocess settings that only change how a run executes
_EXECUTION_ONLY = ("workers", "row_group_slices", "zstd_level")


class PredictError(ValueError):
    """The models or the input cannot be used; the message says why (and holds no PHI)."""


class InputNotAllowed(PredictError):
    """An input named by path or URI lies outside the allowed input prefixes (``serve.allowed_prefixes``)."""


def _canonical(source: str) -> str | None:
    """A local path with every symlink resolved, or an ``s3://bucket/key`` URI as given; None for
    anything else (another scheme, an S3 key with empty, ``.`` or ``..`` segments)."""
    if source.startswith("s3://"):
        bucket, _, key = source.removeprefix("s3://").partition("/")
        segments = key.rstrip("/").split("/") if key.rstrip("/") else []
        if not bucket or any(s in ("", ".", "..") for s in segments):
            return None
        return "/".join(["s3:/", bucket, *segments])
    if "://" in source or "\0" in source:
        return None
    return os.path.realpath(os.path.abspath(source))


def allowed_input(source: str, prefixes: Sequence[str]) -> str:
    """``source`` as it is to be read (a local path with its symlinks resolved) when it lies under one
    of ``prefixes``, else :class:`InputNotAllowed`. A server names where it may read, so a request
    cannot make it walk its own files; the message does not echo the path (it may name a patient)."""
    if not prefixes:
        raise InputNotAllowed("inputs named by path or URI are not accepted here (no allowed input prefixes are "
                              "configured, serve.allowed_prefixes): send the DICOM files or HU slices in the request")
    target = _canonical(source)
    for prefix in prefixes:
        root = _canonical(prefix)
        if target is not None and root is not None and (target == root or target.startswith(root.rstrip("/") + "/")):
            return target
    raise InputNotAllowed(f"an input path or URI is outside the {len(prefixes)} allowed input prefix(es) "
                          "(serve.allowed_prefixes; symlinks are resolved first): refused")


def default_device() -> str:
    """``cuda`` when PyTorch sees a GPU, else ``cpu``: where a loaded :class:`Triage` should score."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class DecisionRule:
    """The per-patient rule (``EvalConfig.patient_rule`` and ``k``) applied to each study."""

    rule: StudyRule = "any"
    k: int = 2

    def __post_init__(self) -> None:
        if self.rule not in (*RULES, EXAM_RULE) or self.k < 1:
            raise PredictError(f"patient rule {self.rule!r} with k={self.k}: rule must be one of "
                               f"{[*RULES, EXAM_RULE]}, k >= 1")

    def eval_config(self) -> EvalConfig:
        return EvalConfig(patient_rule=self.rule, k=self.k)


def composite_preprocess(meta1: ModelMeta, meta2: ModelMeta) -> PreprocessConfig:
    """The preprocessing both stages were trained on, producing every window either one needs
    (the union, stage 1's first). The stages must agree on everything but the windows."""
    configs = []
    for meta in (meta1, meta2):
        stored = {k: v for k, v in meta.raw["preprocess"].items() if k not in _EXECUTION_ONLY}
        configs.append(replace(from_dict(PreprocessConfig, stored), windows=("vascular",), custom_windows=()))
    if configs[0] != configs[1]:
        diff = [f for f in ("size", "crop", "min_image_size") if getattr(configs[0], f) != getattr(configs[1], f)]
        raise PredictError(f"the stage models were trained on different preprocessing ({', '.join(diff)}): "
                           "not a consistent pair")
    union: dict[str, Window] = {}
    for w in [*meta1.windows, *meta2.windows]:
        if union.setdefault(w.name, w) != w:
            raise PredictError(f"window {w.name!r} differs between the stages ({union[w.name]} vs {w}): "
                               "not a consistent pair")
    return replace(configs[0], windows=tuple(union), workers=1,
                   custom_windows=tuple(WindowConfig(w.name, lo=w.lo, hi=w.hi) for w in union.values()))


def _hu(row: Any, hu_column: str) -> np.ndarray:
    rows, cols, value = int(getattr(row, S.ROWS)), int(getattr(row, S.COLS)), getattr(row, hu_column)
    if hu_column == S.HU:
        return S.decode_hu(value, rows, cols)
    hu = np.frombuffer(value, "<i2") if isinstance(value, (bytes, bytearray, memoryview)) else np.asarray(value, np.int16)
    if hu.size != rows * cols:
        raise PredictError(f"{hu_column} holds {hu.size} values, expected {rows}x{cols}")
    return hu.reshape(rows, cols)


@dataclass(frozen=True)
class ModelInputs:
    """What a DICOM call scored, kept (no copy) so that an evidence map (:meth:`Triage.evidence`) is
    drawn on the very input the probabilities came from. Arrays are in stack order; ``rows`` maps the
    output frame's rows to it."""

    stack: np.ndarray  # uint8 [N, C, size, size]: each slice's windows, as preprocess wrote them
    windows: list[Window]  # the channels of ``stack``
    series: np.ndarray  # [N] a series key per slice (neighbours of a 2.5-D model come from its own series)
    position: np.ndarray  # [N] slice_index: the order along z
    boxes: np.ndarray  # int [N, 4]: the crop box (y0, y1, x0, x1; half-open, source pixels)
    rows: np.ndarray  # [N] output row i is stack row rows[i]
    features: np.ndarray | None = None  # [N, D] exam features (a model with an exam model), from the scoring pass


@dataclass(frozen=True)
class ScoredDicom:
    """:meth:`Triage.score_dicom`'s answer: the per-slice frame, the input summary and the inputs."""

    frame: pd.DataFrame
    summary: dict[str, Any]
    inputs: ModelInputs


def _stage_input(model: StageModel, stack: np.ndarray, windows: Sequence[Window], series: np.ndarray,
                 position: np.ndarray, which: Sequence[int] | None = None) -> np.ndarray:
    """The uint8 model input of a stage: its windows, with its neighbours for a 2.5-D model (of the
    rows ``which``, default all)."""
    try:
        channels = window_channels(windows, model.meta.windows)
    except ValueError as e:
        raise PredictError(f"stage {model.meta.stage} model: {e}") from None
    rows = neighbour_rows(series, position, model.meta.model.context)
    return context_stack(stack, rows if which is None else rows[list(which)], channels)


def to_source(heat: np.ndarray, box: Box, shape: tuple[int, int]) -> np.ndarray:
    """A map over the model input (the crop resized to a square) -> a map over the source slice
    ``shape``: resized back to the crop box and placed there, zero outside (the inverse of
    ``lung_crop.crop_resize``)."""
    y0, y1, x0, x1 = (int(v) for v in box)
    if not (0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]):
        raise PredictError(f"crop box {(y0, y1, x0, x1)} does not fit a {shape[0]}x{shape[1]} source slice")
    out = np.zeros(shape, np.float32)
    out[y0:y1, x0:x1] = cv2.resize(np.asarray(heat, np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0, 1)


def load_exam(path: str | Path, stage1: str | Path, stage2: str | Path) -> ExamModel:
    """The exam model at ``path``, refused unless it was trained on the features of exactly these
    stage models (the weights' digests recorded in its metadata): other features mean nothing to it."""
    try:
        exam = load_exam_model(path)
        check_pair(exam, str(stage1), str(stage2))
    except (ExamArtifactError, EvaluationError) as e:
        raise PredictError(f"exam model: {e}: not a consistent model (train the exam model on this stage pair)") from None
    return exam


def exam_description(exam: ExamModel) -> dict[str, Any]:
    """What a version records of its exam model (configuration, tags, report): no weights."""
    return {"arch": exam.net.arch, "features": exam.meta.get("features"), "thresholds": exam.thresholds}


@dataclass
class Triage:
    """A consistent pair of stage models, the preprocessing they need, the per-patient rule and,
    optionally, the exam-level model trained on the pair's features."""

    stage1: StageModel
    stage2: StageModel
    rule: DecisionRule
    preprocess: PreprocessConfig
    #: where both stages score (:meth:`to`); loading is always on CPU, the weights' own device
    device: str = "cpu"
    #: the exam model (scores on CPU: a small GRU over one study's sequence); None for a slice-rule-only version
    exam: ExamModel | None = None

    def __post_init__(self) -> None:
        if self.rule.rule == EXAM_RULE and self.exam is None:
            raise PredictError('patient rule "exam" needs an exam model, and this model has none: register the '
                               "version with its exam model, or use a slice rule (any, k_consecutive, top_k_mean)")

    def to(self, device: str) -> Triage:
        """Both stage models moved to ``device`` (``cuda`` on a GPU server), scoring there; returns self."""
        for stage in (self.stage1, self.stage2):
            stage.model.to(device)
        self.device = device
        return self

    @classmethod
    def load(cls, stage1: str | Path, stage2: str | Path, *, rule: DecisionRule = DecisionRule(),
             exam: str | Path | None = None) -> Triage:
        m1, m2 = load_model(stage1), load_model(stage2)
        if (m1.meta.stage, m2.meta.stage) != (1, 2):
            raise PredictError(f"expected a stage 1 and a stage 2 model, got stages {m1.meta.stage} and {m2.meta.stage}")
        exam_model = None if exam is None else load_exam(exam, stage1, stage2)
        return cls(m1, m2, rule, composite_preprocess(m1.meta, m2.meta), exam=exam_model)

    def config(self) -> dict[str, Any]:
        """What the registered model stores next to the artifacts (and the model card shows); ``exam``
        only for a version that carries an exam model."""
        config = {
            "format": FORMAT,
            "rule": {"rule": self.rule.rule, "k": self.rule.k},
            "thresholds": {"stage1": self.stage1.meta.threshold, "stage2": self.stage2.meta.threshold},
            "windows": [w.to_dict() for w in resolve_windows(self.preprocess)],
            "size": self.preprocess.size,
            "crop_mode": self.preprocess.crop.mode,
        }
        return config if self.exam is None else config | {"exam": exam_description(self.exam)}

    @classmethod
    def from_config(cls, stage1: str | Path, stage2: str | Path, config_file: str | Path,
                    exam: str | Path | None = None) -> Triage:
        """Rebuild a stored model; its configuration and its artifacts must agree on carrying an exam model."""
        stored = json.loads(Path(config_file).read_text())
        if stored.get("format") != FORMAT:
            raise PredictError(f"{config_file}: format {stored.get('format')!r}, this version reads {FORMAT!r}")
        if ("exam" in stored) != (exam is not None):
            raise PredictError(f"{config_file}: the configuration and the artifacts disagree on whether the model carries "
                               "an exam model: not a consistent model")
        return cls.load(stage1, stage2, rule=DecisionRule(**stored["rule"]), exam=exam)

    # ---------------------------------------------------------------------------- scoring
    def score(self, stack: np.ndarray, windows: Sequence[Window], series: np.ndarray,
              position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 window stacks ``[N, C, H, W]`` (channels = ``windows``) of slices of ``series`` (a key
        per slice) at ``position`` along z -> (p_disease, p_pe); a 2.5-D model reads each slice with
        its neighbours in its series (``windows.neighbour_rows``)."""
        p_disease, p_pe, _ = self.score_features(stack, windows, series, position)
        return p_disease, p_pe

    def score_features(self, stack: np.ndarray, windows: Sequence[Window], series: np.ndarray,
                       position: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`score` and, with an exam model, each slice's exam features ``[N, D]`` from the same
        forward pass (None without one)."""
        if len(stack) == 0:
            return np.empty(0, np.float32), np.empty(0, np.float32), None
        inputs = [_stage_input(model, stack, windows, series, position) for model in (self.stage1, self.stage2)]
        if self.exam is None:
            probs = [model.predict_proba(x, device=self.device) for model, x in zip((self.stage1, self.stage2), inputs,
                                                                                    strict=True)]
            return probs[0], probs[1], None
        return self._embed(inputs, self.exam)

    def _embed(self, inputs: Sequence[np.ndarray], exam: ExamModel,
               batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Both stages' probabilities and the exam features, one forward pass per batch: the layout
        ``training.exam.embed_split`` trains on (per stage its pooled features, then its logit)."""
        nets = [self.stage1.model.eval(), self.stage2.model.eval()]
        dims = [int(net.head.in_features) for net in nets]
        logits = torch.as_tensor(np.cumsum([d + 1 for d in dims]) - 1, device=self.device)
        keep = torch.as_tensor(feature_columns(dims, exam.meta.get("features", "all")), device=self.device)
        torch.set_flush_denormal(True)  # as artifact.predict_proba: the same numbers as a version without exam model
        probs, features = [], []
        with torch.inference_mode():
            for start in range(0, len(inputs[0]), batch_size):
                xs = [torch.from_numpy(uint8_to_centred(x[start : start + batch_size])).to(self.device) for x in inputs]
                f = slice_features(nets, xs, "all").float()
                probs.append(torch.sigmoid(f[:, logits]).cpu().numpy())
                features.append(f[:, keep].cpu().numpy())
        p = np.concatenate(probs)
        return p[:, 0], p[:, 1], np.concatenate(features)

    def evidence(self, inputs: ModelInputs, row: int, *, stage: int, shape: tuple[int, int],
                 attribution: Attribution = Attribution()) -> np.ndarray:
        """Where stage ``stage``'s model found its evidence on output row ``row`` of
        :meth:`score_dicom`: float32 [rows, cols] over the source slice of ``shape``, in [0, 1]
        (zero outside the crop box; all zero without positive evidence). The windows' maps are
        averaged: one map a reader can put on one picture of the slice."""
        if stage not in (1, 2):
            raise PredictError(f"stage must be 1 or 2, got {stage}")
        model = self.stage1 if stage == 1 else self.stage2
        at = int(inputs.rows[row])
        x = _stage_input(model, inputs.stack, inputs.windows, inputs.series, inputs.position, [at])
        maps = attribution.maps(model.model, torch.from_numpy(uint8_to_centred(x)).to(self.device))[0]
        heat = to_source(maps.mean(0), Box(*(int(v) for v in inputs.boxes[at])), shape)
        return heat / heat.max() if heat.max() > 0 else heat  # its peak at 1 again after the averaging and resizing

    def _per_slice(self, keys: pd.DataFrame, p_disease: np.ndarray, p_pe: np.ndarray,
                   features: np.ndarray | None = None) -> pd.DataFrame:
        """Keys + probabilities (NaN: skipped) + the scored slices' exam features (in row order) ->
        the output frame, with the per-study decision."""
        out = keys[KEY_COLUMNS].reset_index(drop=True).copy()
        out[S.P_DISEASE], out[S.P_PE] = p_disease.astype(float), p_pe.astype(float)
        scored = out[S.P_DISEASE].notna().to_numpy()
        triage = np.full(len(out), SKIPPED, dtype=object)
        triage[scored] = cascade_labels(p_disease[scored], p_pe[scored], self.stage1.meta.threshold, self.stage2.meta.threshold)
        out[TRIAGE] = triage
        out[FLAGGED] = triage == S.Label.PE.value
        if self.exam is not None:
            out = self.with_exam(out, features)
        decisions = study_decisions(out[scored], self)
        by_study = dict(zip(decisions[S.STUDY_UID], decisions["triage"], strict=True))
        out[STUDY_TRIAGE] = [by_study.get(str(study), SKIPPED) for study in out[S.STUDY_UID]]
        return out

    def with_exam(self, frame: pd.DataFrame, features: np.ndarray | None) -> pd.DataFrame:
        """``frame`` with each row's study's exam probabilities (NaN for a study without a scored slice),
        from the ``features`` of its scored rows (in row order) in z order (series, then slice index), as
        the exam model was trained: a study scored series by series (``pacs``) is one exam again."""
        scored = frame[S.P_DISEASE].notna().to_numpy()
        if self.exam is None or features is None or len(features) != int(scored.sum()):
            raise PredictError("exam features are needed for every scored slice, and only with an exam model")
        done = frame[scored]
        studies = done[S.STUDY_UID].astype(str).to_numpy()
        by_study: dict[str, list[int]] = {}
        for i in np.lexsort((done[S.SLICE_INDEX].to_numpy(), done[S.SERIES_UID].astype(str).to_numpy())):
            by_study.setdefault(studies[i], []).append(int(i))
        probs = self.exam.predict_proba([features[rows] for rows in by_study.values()]) if by_study else np.zeros((0, 2))
        found = dict(zip(by_study, probs, strict=True))
        exam = np.array([found.get(str(study), (np.nan, np.nan)) for study in frame[S.STUDY_UID]], float).reshape(-1, 2)
        return frame.assign(**{EXAM_P_DISEASE: exam[:, 0], EXAM_P_PE: exam[:, 1]})

    def predict_slices(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One output row per input row (same order). Input: :data:`SLICE_INPUT_COLUMNS` and the
        pixels as ``hu`` (int16 bytes or a nested list) or ``hu_planes`` (a slices dataset row)."""
        hu_column = next((c for c in (HU_INPUT, S.HU) if c in frame.columns and frame[c].notna().all()), None)
        missing = [c for c in SLICE_INPUT_COLUMNS if c not in frame.columns or frame[c].isna().any()]
        if missing or hu_column is None:
            raise PredictError(f"slice input needs columns {SLICE_INPUT_COLUMNS} and {HU_INPUT!r} (or {S.HU!r}); "
                               f"missing or null: {missing + ([] if hu_column else [HU_INPUT])}")
        windows = resolve_windows(self.preprocess)
        size = self.preprocess.size
        stack = np.zeros((len(frame), len(windows), size, size), np.uint8)
        kept = np.zeros(len(frame), bool)
        patch = np.empty((size, size), np.int16)
        rows = list(frame.itertuples(index=False))
        for idx in frame.reset_index(drop=True).groupby([S.STUDY_UID, S.SERIES_UID], sort=False).indices.values():
            idx = idx[np.argsort(frame[S.SLICE_INDEX].to_numpy()[idx], kind="stable")]
            hus = [_hu(rows[i], hu_column) for i in idx]
            spacings = [(float(getattr(rows[i], S.PIXEL_SPACING_ROW)), float(getattr(rows[i], S.PIXEL_SPACING_COL)))
                        for i in idx]
            union = series_box(zip(hus, spacings, strict=True), self.preprocess)
            for i, hu, spacing in zip(idx, hus, spacings, strict=True):
                if too_small(hu.shape[0], hu.shape[1], self.preprocess):
                    continue
                try:
                    window_slice(hu, spacing, self.preprocess, windows, stack[i], union=union, patch=patch)
                except NoBodyError:
                    continue
                kept[i] = True
        p_disease, p_pe = np.full(len(frame), np.nan), np.full(len(frame), np.nan)
        series = (frame[S.STUDY_UID].astype(str) + "\x1f" + frame[S.SERIES_UID].astype(str)).to_numpy()
        p_disease[kept], p_pe[kept], features = self.score_features(stack[kept], windows, series[kept],
                                                                    frame[S.SLICE_INDEX].to_numpy()[kept])
        return self._per_slice(frame, p_disease, p_pe, features)

    def predict_dicom(self, sources: str | Sequence[str], *, ingest: IngestConfig = IngestConfig(),
                      allowed_prefixes: Sequence[str] | None = None,
                      timings: dict[str, float] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
        """DICOM files or folders (local or ``s3://``) -> (per-slice frame, input summary): :meth:`score_dicom`
        without the model inputs."""
        scored = self.score_dicom(sources, ingest=ingest, allowed_prefixes=allowed_prefixes, timings=timings)
        return scored.frame, scored.summary

    def score_dicom(self, sources: str | Sequence[str], *, ingest: IngestConfig = IngestConfig(),
                    allowed_prefixes: Sequence[str] | None = None,
                    timings: dict[str, float] | None = None) -> ScoredDicom:
        """DICOM files or folders (local or ``s3://``) -> per-slice frame, input summary and the model
        inputs (for :meth:`evidence`).

        ``allowed_prefixes``: where a source may lie (:func:`allowed_input`; a server passes
        ``serve.allowed_prefixes``); None reads any path, for the operator's own command line.
        ``timings``, when given, gets the seconds of each step (``decode``: ingest; ``crop``: crop,
        window and resize; ``model``: both stages), so a server can show where a request's time goes.
        Several studies give one decision each. Raises :class:`PredictError` when nothing in the
        input is a usable CT slice."""
        sources = [sources] if isinstance(sources, str) else list(sources)
        if not sources:
            raise PredictError("no DICOM input given")
        if allowed_prefixes is not None:
            sources = [allowed_input(s, allowed_prefixes) for s in sources]
        timings = {} if timings is None else timings
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="pe-triage-predict-") as tmp:
            root = Path(tmp)
            pseudo = Pseudonymizer(secrets.token_bytes(32), _SITE)  # unlinkable: the key dies with the call
            files: Counter[str] = Counter()
            reasons: Counter[str] = Counter()
            for source in _folders(sources, root / "files"):
                report = ingest_site(_SITE, source, str(root / "slices"), pseudo=pseudo, config=replace(ingest, workers=1))
                files.update(report["files"])
                reasons.update(report["quarantine_reasons"])
            summary: dict[str, Any] = {"files": dict(files), "quarantine_reasons": dict(sorted(reasons.items()))}
            if not list((root / "slices").glob(f"{S.SITE}=*/*.parquet")):
                raise PredictError(f"no CT slices in the input: {files['seen']} file(s) seen, "
                                   f"{files['quarantined']} quarantined ({dict(reasons) or 'none'})")
            summary["acquisition"] = _acquisition(sorted((root / "slices").glob(f"{S.SITE}=*/*.parquet")))
            hu = summarise(location(str(root)), sorted(str(p) for p in (root / "slices").glob(f"{S.SITE}=*/*.parquet")),
                           self.preprocess.crop)  # for monitoring: HU drift against the training data
            summary["hu"] = {"fractions": hu.fractions(), "median": hu.median()}
            timings["decode"] = time.perf_counter() - start
            report = preprocess(str(root / "slices"), str(root / "windows"), config=self.preprocess)
            summary["slices_skipped"] = dict(Counter(s["reason"] for s in report["slices_skipped"]))
            keys, stack, windows = _read_windows(sorted((root / "windows").glob(f"{S.SITE}=*/*.parquet")))
        if not len(keys):
            raise PredictError(f"no slice of the input could be scored (skipped: {summary['slices_skipped']})")
        series = (keys[S.STUDY_UID].astype(str) + "\x1f" + keys[S.SERIES_UID].astype(str)).to_numpy()
        timings["crop"] = time.perf_counter() - start - timings["decode"]
        keys[S.P_DISEASE], keys[S.P_PE], features = self.score_features(stack, windows, series, keys[S.SLICE_INDEX].to_numpy())
        timings["model"] = time.perf_counter() - start - timings["decode"] - timings["crop"]
        keys[_ROW] = np.arange(len(keys))
        slices = _ordinal_ids(keys)
        inputs = ModelInputs(stack, windows, series, keys[S.SLICE_INDEX].to_numpy(), keys[_CROP].to_numpy(np.int64),
                             slices.pop(_ROW).to_numpy(), features)
        frame = self._per_slice(slices, slices[S.P_DISEASE].to_numpy(), slices[S.P_PE].to_numpy(),
                                None if features is None else features[inputs.rows])
        return ScoredDicom(frame, summary, inputs)


def _read_windows(paths: Sequence[Path]) -> tuple[pd.DataFrame, np.ndarray, list[Window]]:
    """Keys (pseudonyms, and a hash of each slice's windows for ordering), the window stacks and their
    windows of a windows dataset, all series together: one batched pass through each model."""
    keys, stacks, windows = [], [], None
    for path in paths:
        table = pq.read_table(path)
        defs = json.loads((table.schema.metadata or {})[S.META_WINDOWS.encode()])
        windows = windows or [Window.from_dict(d) for d in defs]  # one run: same in every file
        stacks.append(S.windows_stack(table[S.WINDOWS], S.windows_shape(table.schema.field(S.WINDOWS))))
        frame = table.select([*KEY_COLUMNS, *_CROP]).to_pandas()
        frame[_CONTENT] = [hashlib.sha256(s.tobytes()).hexdigest() for s in stacks[-1]]
        keys.append(frame)
    if not keys:
        return pd.DataFrame(columns=[*KEY_COLUMNS, *_CROP, _CONTENT]), np.empty((0, 0, 0, 0), np.uint8), []
    return pd.concat(keys, ignore_index=True), np.concatenate(stacks), windows or []


#: acquisition fields ingest keeps that a monitoring record carries (``pe_triage.monitoring``)
ACQUISITION_COLUMNS = [S.MANUFACTURER, S.KERNEL, S.KVP, S.PIXEL_SPACING_ROW, S.SLICE_THICKNESS]


def _acquisition(paths: Sequence[Path]) -> dict[str, Any]:
    """Each acquisition field's most common value over the input's slices: no identifiers, so the
    summary can go into a monitoring record."""
    frame = pd.concat([pq.read_table(p, columns=ACQUISITION_COLUMNS).to_pandas() for p in paths], ignore_index=True)
    values = {c: frame[c].dropna().mode() for c in ACQUISITION_COLUMNS}
    return {c: (v.iloc[0].item() if hasattr(v.iloc[0], "item") else v.iloc[0]) if len(v) else None for c, v in values.items()}


def _folders(sources: Sequence[str], staging: Path) -> list[str]:
    """Folders and prefixes as they are; single files copied into one staging folder (ingest reads folders)."""
    folders, copied = [], 0
    for source in sources:
        loc = location(source)
        kind = loc.fs.get_file_info(loc.root).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{source}: no such file, folder or prefix")
        if kind == pafs.FileType.Directory:
            folders.append(source)
            continue
        staging.mkdir(parents=True, exist_ok=True)
        (staging / f"{copied:06d}.dcm").write_bytes(loc.read(loc.root))
        copied += 1
    return folders + ([str(staging)] if copied else [])


def _ordinal_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """Pseudonyms -> ``study-N`` / ``series-N``, numbered in an order that does not depend on the
    random key (by the content hash of the first slice), so two calls on the same input agree."""
    first = frame.groupby([S.STUDY_UID, S.SERIES_UID])[_CONTENT].min()
    study_n = first.groupby(level=0).min().rank(method="first").astype(int)
    series_n = first.groupby(level=0).rank(method="first").astype(int)
    keys = pd.MultiIndex.from_frame(frame[[S.STUDY_UID, S.SERIES_UID]])
    out = frame.drop(columns=[_CONTENT]).assign(
        _study=frame[S.STUDY_UID].map(study_n).to_numpy(), _series=series_n.reindex(keys).to_numpy())
    out = out.sort_values(["_study", "_series", S.SLICE_INDEX]).reset_index(drop=True)
    out[S.STUDY_UID] = "study-" + out.pop("_study").astype(str)
    out[S.SERIES_UID] = "series-" + out.pop("_series").astype(str)
    return out


def study_decisions(per_slice: pd.DataFrame, triage: Triage) -> pd.DataFrame:
    """One row per study: ``study_uid``, ``triage`` (wnl | other | pe), ``disease_score``,
    ``pe_score``, ``slices``. The evaluation's per-patient rule, a study standing for the patient;
    with the rule ``"exam"`` the exam model's cascade at its thresholds (its probabilities as scores)."""
    if per_slice.empty:
        return pd.DataFrame({S.STUDY_UID: [], "triage": [], "disease_score": [], "pe_score": [], "slices": []})
    if triage.rule.rule == EXAM_RULE:
        return _exam_decisions(per_slice, triage)
    pred = pd.DataFrame({
        S.SITE: _SITE, S.PATIENT_ID: per_slice[S.STUDY_UID].astype(str), S.SERIES_UID: per_slice[S.SERIES_UID].astype(str),
        S.SLICE_INDEX: per_slice[S.SLICE_INDEX].astype(int), S.P_DISEASE: per_slice[S.P_DISEASE], S.P_PE: per_slice[S.P_PE],
    })
    pt = patient_decisions(pred, threshold_stage1=triage.stage1.meta.threshold, threshold_stage2=triage.stage2.meta.threshold,
                           config=triage.rule.eval_config())
    return pd.DataFrame({S.STUDY_UID: pt["patient_id"], "triage": pt["predicted"], "disease_score": pt["disease_score"],
                         "pe_score": pt["pe_score"], "slices": pt["slices"]})


def _exam_decisions(per_slice: pd.DataFrame, triage: Triage) -> pd.DataFrame:
    """:func:`study_decisions` of the exam model: its columns (one value per study) through the cascade."""
    if triage.exam is None or EXAM_P_DISEASE not in per_slice.columns:
        raise PredictError('patient rule "exam" needs the exam model\'s probabilities, and the slices have none')
    g = per_slice.assign(_study=per_slice[S.STUDY_UID].astype(str)).groupby("_study")
    p_d, p_pe = g[EXAM_P_DISEASE].first().to_numpy(float), g[EXAM_P_PE].first().to_numpy(float)
    t = triage.exam.thresholds
    return pd.DataFrame({S.STUDY_UID: g.size().index.to_numpy(object),
                         "triage": cascade_labels(p_d, p_pe, t["disease"], t["pe"]),
                         "disease_score": p_d, "pe_score": p_pe, "slices": g.size().to_numpy()})


def _exam_report(rows: pd.DataFrame, triage: Triage) -> dict[str, Any]:
    """A study's exam-model figures in the report: probabilities, flags at the model's thresholds,
    and whether they decide the study (rule ``"exam"``) or stand beside the slice rule."""
    if triage.exam is None:
        return {}
    p_d, p_pe, t = rows[EXAM_P_DISEASE].iloc[0], rows[EXAM_P_PE].iloc[0], triage.exam.thresholds
    disease = None if pd.isna(p_d) else bool(p_d >= t["disease"])
    pe = None if disease is None or pd.isna(p_pe) else bool(disease and p_pe >= t["pe"])
    return {"exam": {S.P_DISEASE: _num(p_d), S.P_PE: _num(p_pe), "disease_flag": disease, "pe_flag": pe},
            "decided_by": "exam_model" if triage.rule.rule == EXAM_RULE else "rule"}


def triage_report(per_slice: pd.DataFrame, triage: Triage, *, model: str,
                  input_summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON report of ``pe-triage predict``: per study its decision, flagged slices and every
    slice's probabilities (slice_index counts from the lowest position along the patient axis)."""
    studies = []
    for study, rows in per_slice.groupby(S.STUDY_UID, sort=False):
        series = []
        for uid, s in rows.groupby(S.SERIES_UID, sort=False):
            series.append({
                "series": uid,
                "slices": [{"slice_index": int(r[S.SLICE_INDEX]), S.P_DISEASE: _num(r[S.P_DISEASE]), S.P_PE: _num(r[S.P_PE]),
                            TRIAGE: r[TRIAGE]} for r in s.to_dict("records")],
            })
        flagged = rows[rows[FLAGGED]]
        studies.append({
            "study": study,
            "triage": rows[STUDY_TRIAGE].iloc[0],
            "slices": len(rows),
            "slice_counts": {k: int(v) for k, v in rows[TRIAGE].value_counts().sort_index().items()},
            "flagged_slices": [{"series": r[S.SERIES_UID], "slice_index": int(r[S.SLICE_INDEX]), S.P_PE: _num(r[S.P_PE])}
                               for r in flagged.to_dict("records")],
            "series": series,
            **_exam_report(rows, triage),
        })
    exam = {} if triage.exam is None else {"exam_model": exam_description(triage.exam)}
    return {
        "model": model,
        "rule": triage.config()["rule"],
        "thresholds": triage.config()["thresholds"],
        **exam,
        "input": input_summary or {},
        "studies": studies,
    }


def _num(value: float) -> float | None:
    return None if pd.isna(value) else round(float(value), 6)
