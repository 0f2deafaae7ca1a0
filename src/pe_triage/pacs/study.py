"""One study's triage with its result objects: the core that DICOMweb input and a DICOM node share.

:func:`triage_folder` takes a folder of one study's DICOM files (as retrieved or received) and a
loaded :class:`~pe_triage.predict.Triage`; it triages each CT series through the same ingest rules
as ``pe-triage predict`` (``Triage.score_dicom``), combines them into one study decision and
returns the JSON report plus the SR and, for a flagged study, the key image with the evidence map
drawn on the model input predict scored (``Triage.evidence``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydicom import Dataset

from pe_triage import schema as S
from pe_triage.config import IngestConfig, PacsConfig
from pe_triage.evaluation.gradcam import Attribution
from pe_triage.pacs.dicomweb import PacsError
from pe_triage.pacs.results import SliceResult, build_key_image, build_sr
from pe_triage.pacs.source import SourceSlice, ordered_slices, read_header, series_files
from pe_triage.predict import (
    FLAGGED,
    STUDY_TRIAGE,
    ModelInputs,
    PredictError,
    Triage,
    study_decisions,
    triage_report,
)

log = logging.getLogger(__name__)
#: the stage whose evidence the key image shows: the PE model's for a PE study, else the disease model's
EVIDENCE_STAGE = {S.Label.PE.value: 2, S.Label.OTHER.value: 1}


@dataclass(frozen=True)
class StudyResult:
    """The JSON report (no identifiers) and the result objects (identifiers: for the source PACS only)."""

    report: dict[str, Any]
    #: the SR, then the key image when the study is flagged
    objects: list[Dataset]


def _ct_series(folder: Path) -> tuple[dict[str, list[Path]], int]:
    """CT series of the folder's one study, and how many files are neither CT nor DICOM."""
    groups = series_files(folder)
    ct, studies, other = {}, set(), 0
    for uid, paths in groups.items():
        header = read_header(paths[0]) if uid else None
        if header is None or header.get("Modality") != "CT":
            other += len(paths)
            continue
        studies.add(str(header.get("StudyInstanceUID", "")))
        ct[uid] = paths
    if len(studies) > 1:
        raise PacsError(f"the input holds {len(studies)} studies; triage one study at a time")
    if not ct:
        raise PacsError(f"the input has no CT series ({other} file(s), none of them CT)")
    return ct, other


def _score_series(paths: list[Path], triage: Triage,
                  ingest: IngestConfig) -> tuple[pd.DataFrame, dict, list[SourceSlice], ModelInputs]:
    """One series through predict, its source slices in ``slice_index`` order and its model inputs."""
    scored = triage.score_dicom([str(p) for p in paths], ingest=ingest)
    frame, summary = scored.frame, scored.summary
    order = ordered_slices(paths, ingest)
    if len(frame) and int(frame[S.SLICE_INDEX].max()) >= len(order):
        raise PacsError(f"cannot match the scored slices to the source files ({len(order)} usable files, "
                        f"slice index up to {int(frame[S.SLICE_INDEX].max())})")
    return frame, summary, order, scored.inputs


def _evidence(triage: Triage, where: tuple[ModelInputs, int], source: SourceSlice, stage: int,
              attribution: Attribution) -> np.ndarray | None:
    """The key image's evidence map (source pixels); None, logged, when it cannot be drawn: the
    result objects still go back, their caption saying there is no map."""
    try:
        return triage.evidence(*where, stage=stage, shape=(int(source.header.Rows), int(source.header.Columns)),
                               attribution=attribution)
    except PredictError as e:
        log.warning("no evidence map for the key image: %s", e)
        return None


def _merge(summaries: list[dict], other: int, refused: list[str]) -> dict[str, Any]:
    files: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for s in summaries:
        files.update(s["files"])
        reasons.update(s["quarantine_reasons"])
        skipped.update(s.get("slices_skipped", {}))
    return {"files": dict(files), "quarantine_reasons": dict(sorted(reasons.items())), "slices_skipped": dict(skipped),
            "not_ct_files": other, "series_refused": refused,
            "acquisition": next((s["acquisition"] for s in summaries if s.get("acquisition")), {})}


def triage_folder(folder: Path, triage: Triage, *, model: str, version: str, ingest: IngestConfig,
                  config: PacsConfig, attribution: Attribution = Attribution()) -> StudyResult:
    """Triage the study in ``folder``; :class:`PacsError` when no CT series of it can be triaged.
    ``attribution`` draws the key image's evidence map (``Attribution.of(config.evaluate)``)."""
    series, other = _ct_series(folder)
    frames: list[pd.DataFrame] = []
    summaries: list[dict] = []
    refused: list[str] = []
    slices: list[SliceResult] = []
    exam_features: list[np.ndarray] = []  # per series, in its output rows' order (a model with an exam model)
    # the most suspicious slice so far: its place in ``slices``, its series' model inputs and its row in
    # them; only that series' inputs are kept, so memory stays one series' windows whatever the study
    top: tuple[int, ModelInputs, int] | None = None
    for paths in series.values():
        try:
            frame, summary, order, scored = _score_series(paths, triage, ingest)
        except PredictError as e:
            refused.append(str(e))
            continue
        frame[S.SERIES_UID] = f"series-{len(frames) + 1}"
        frames.append(frame)
        summaries.append(summary)
        if scored.features is not None:
            exam_features.append(scored.features[scored.rows])
        slices += [SliceResult(order[int(r[S.SLICE_INDEX])], float(r[S.P_DISEASE]), float(r[S.P_PE]), bool(r[FLAGGED]))
                   for r in frame.to_dict("records")]
        row = int(np.argmax(frame[S.P_PE].to_numpy()))
        if top is None or slices[top[0]].p_pe < float(frame[S.P_PE].iloc[row]):
            top = (len(slices) - len(frame) + row, scored, row)
    if not frames:
        raise PacsError(f"no CT series of the study could be triaged: {'; '.join(refused)}")
    per_slice = pd.concat(frames, ignore_index=True)
    if triage.exam is not None:  # one exam over all the study's series, not one per series
        per_slice = triage.with_exam(per_slice, np.concatenate(exam_features))
    decision = study_decisions(per_slice, triage).iloc[0]
    per_slice[STUDY_TRIAGE] = decision["triage"]
    report = triage_report(per_slice, triage, model=model, input_summary=_merge(summaries, other, refused))
    report["model_version"] = version
    scores = (float(decision["disease_score"]), float(decision["pe_score"]))
    objects: list[Dataset] = [build_sr(decision["triage"], scores, slices, model=model, version=version, config=config)]
    if decision["triage"] == S.Label.PE.value and top is not None:
        stage = EVIDENCE_STAGE[decision["triage"]]
        evidence = _evidence(triage, top[1:], slices[top[0]].source, stage, attribution)
        objects.append(build_key_image(slices[top[0]], decision["triage"], model=model, version=version, config=config,
                                       evidence=evidence, evidence_label=f"{attribution.label}, stage {stage} model"))
    return StudyResult(report, objects)
