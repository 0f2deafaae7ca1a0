"""The exam model: shapes, padding that changes nothing, and an artifact that round-trips and refuses
what it did not write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pe_triage.config import ModelConfig
from pe_triage.models import build_model
from pe_triage.models.exam import (
    META,
    WEIGHTS,
    ExamArtifactError,
    ExamNet,
    load_exam_model,
    pad_sequences,
    save_exam_model,
    slice_features,
)

ARCHS = ["gru", "attention"]


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes(arch: str) -> None:
    net = ExamNet(8, arch=arch, hidden=16)  # type: ignore[arg-type]
    x, mask = pad_sequences([np.ones((5, 8), np.float32), np.ones((3, 8), np.float32)])
    exam, slices = net(x, mask)
    assert exam.shape == (2, 2) and slices.shape == (2, 5, 2)
    assert mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_changes_nothing(arch: str) -> None:
    torch.manual_seed(0)
    net = ExamNet(6, arch=arch, hidden=8).eval()  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(n, 6)).astype(np.float32) for n in (7, 2, 4)]
    with torch.no_grad():
        batched, batched_slices = net(*pad_sequences(seqs))
        for i, s in enumerate(seqs):
            alone, alone_slices = net(*pad_sequences([s]))
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched_slices[i, : len(s)], alone_slices[0], atol=1e-5, rtol=1e-5)
        # garbage in the padding does not leak into the result
        x, mask = pad_sequences(seqs)
        x[~mask] = 1e6
        torch.testing.assert_close(net(x, mask)[0], batched, atol=1e-5, rtol=1e-5)


def test_a_mask_that_is_not_a_prefix_or_is_empty_is_refused() -> None:
    net = ExamNet(4)
    x = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="valid slices first"):
        net(x, torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match="at least one slice"):
        net(x, torch.tensor([[False, False, False]]))
    with pytest.raises(ValueError, match=r"expected features \[B, T, 4\]"):
        net(torch.zeros(1, 3, 5), torch.ones(1, 3, dtype=torch.bool))


def test_slice_features_are_each_stage_embedding_then_its_logit() -> None:
    torch.manual_seed(0)
    nets = [build_model(ModelConfig(arch="plain_cnn", width=0.25, context=c), 2).eval() for c in (0, 1)]
    inputs = [torch.randn(3, 2, 32, 32), torch.randn(3, 6, 32, 32)]  # the second model is 2.5-D: 2 windows x 3 slices
    with torch.no_grad():
        every = slice_features(nets, inputs, "all")
        logits = slice_features(nets, inputs, "logits")
        embeddings = slice_features(nets, inputs, "embeddings")
        d0 = nets[0].head.in_features
        assert every.shape[1] == embeddings.shape[1] + 2 and logits.shape == (3, 2)
        torch.testing.assert_close(logits[:, 0], nets[0](inputs[0])[:, 0])
        torch.testing.assert_close(every[:, d0], logits[:, 0])
        torch.testing.assert_close(every[:, -1], logits[:, 1])


def _saved(tmp_path: Path) -> tuple[Path, ExamNet]:
    torch.manual_seed(1)
    net = ExamNet(5, arch="gru", hidden=8).eval()
    net.mean.fill_(0.5)
    return save_exam_model(tmp_path / "exam", net, {"thresholds": {"disease": 0.3, "pe": 0.6}, "features": "all"}), net


def test_the_artifact_round_trips(tmp_path: Path) -> None:
    path, net = _saved(tmp_path)
    loaded = load_exam_model(path)
    seqs = [np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)]
    with torch.no_grad():
        expected = torch.sigmoid(net(*pad_sequences(seqs))[0]).numpy()
    np.testing.assert_allclose(loaded.predict_proba(seqs), expected, rtol=1e-6)
    assert loaded.thresholds == {"disease": 0.3, "pe": 0.6} and loaded.meta["features"] == "all"
    assert float(loaded.net.mean[0]) == 0.5, "the standardisation travels with the weights"


def test_the_artifact_refuses_what_it_did_not_write(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    meta = json.loads((path / META).read_text())
    (path / META).write_text(json.dumps({**meta, "format": "pe-triage-exam/99"}))
    with pytest.raises(ExamArtifactError, match="format 'pe-triage-exam/99'"):
        load_exam_model(path)
    (path / META).write_text(json.dumps({**meta, "net": {**meta["net"], "hidden": 9}}))
    with pytest.raises(ExamArtifactError, match="weights do not match"):
        load_exam_model(path)
    (path / META).write_text(json.dumps(meta))
    good = (path / WEIGHTS).read_bytes()
    torch.save({"payload": object()}, path / WEIGHTS)  # a pickled object, not a tensor
    with pytest.raises(ExamArtifactError, match="refused, none of it run"):
        load_exam_model(path)
    (path / WEIGHTS).write_bytes(good[: len(good) // 2])
    with pytest.raises(ExamArtifactError, match="corrupt"):
        load_exam_model(path)
    with pytest.raises(ExamArtifactError, match="no exam.json"):
        load_exam_model(tmp_path)
    with pytest.raises(ExamArtifactError, match="needs thresholds"):
        save_exam_model(tmp_path / "x", ExamNet(2), {"thresholds": {"disease": 0.5}})
