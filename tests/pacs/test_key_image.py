"""The key image shows where the model found its evidence: the stage model's map over the model input,
mapped back through the lung crop onto the full source slice, burnt in over the slice with a ring at
its peak. Known answer: a model that sees only bright pixels, on a study with one bright lesion placed
off-centre in a crop box that is not the whole image (a wrong crop mapping misses it by ~90 px)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import ct_slice, write
from pacs.pacs_servers import dciodvfy_errors, tiny_triage
from pydicom import Dataset
from torch import Tensor, nn

from pe_triage.artifact import StageModel
from pe_triage.config import IngestConfig, PacsConfig
from pe_triage.evaluation.gradcam import peak_on_lesion
from pe_triage.lung_crop import find_lung_box
from pe_triage.models import MultiWindowNet
from pe_triage.pacs import StudyResult, triage_folder
from pe_triage.predict import PredictError, Triage, to_source

INGEST = IngestConfig(workers=1)
PACS = PacsConfig(uid_root="1.2.826.0.1.3680043.10.1234.", disclaimer="TEST DISCLAIMER: not for diagnosis")
SIZE, SPACING = 512, 0.7
#: the lesion: centre (row, col) and radius in source pixels, in the right lung, on slice LESION_SLICE only
LESION, RADIUS, LESION_SLICE = (330, 340), 16, 2


def chest(lesion: bool) -> np.ndarray:
    """HU: an off-centre body (40 HU) with two lungs (-850 HU); a 1000 HU disc at LESION when asked."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    hu = np.full((SIZE, SIZE), -1000, np.int16)
    hu[((yy - 280) / 150) ** 2 + ((xx - 230) / 200) ** 2 < 1] = 40
    for cx in (150, 320):
        hu[((yy - 270) / 100) ** 2 + ((xx - cx) / 60) ** 2 < 1] = -850
    if lesion:
        hu[lesion_mask()] = 1000
    return hu


def lesion_mask() -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - LESION[0]) ** 2 + (xx - LESION[1]) ** 2 <= RADIUS**2


class Bright(nn.Module):
    """One feature map at output stride 4: the brightness above the window centre, over all slices."""

    out_channels = 1

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(F.relu(x).sum(1, keepdim=True), 4)


def known_triage(root: Path, context: int = 0) -> Triage:
    """Flags every slice; stage 2 answers only to bright pixels (more positive the more of them)."""
    base = tiny_triage(root, 0.0)
    model = MultiWindowNet(lambda _in_channels: Bright(), len(base.stage2.meta.windows), slices_per_window=2 * context + 1)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
        model.head.bias.zero_()
    meta = replace(base.stage2.meta, model=replace(base.stage2.meta.model, context=context))
    return replace(base, stage2=StageModel(model.eval(), meta))


def write_study(folder: Path, series: str = "1.2.3.4.5", lesion: bool = True, shift_hu: int = 0) -> Path:
    """Five slices 1 mm apart (z order = SOP order), the lesion on slice LESION_SLICE only (if any)."""
    for i in range(5):
        write(ct_slice(series=series, sop=f"{series}.{i + 1}", z=float(i), instance=5 - i, size=SIZE, spacing=SPACING,
                       hu=chest(lesion and i == LESION_SLICE) + shift_hu), folder / f"{series}-{i:04d}.dcm")
    return folder


def ring_centre(key: Dataset) -> tuple[float, float]:
    """Centre of the ring at the map's peak: its colour (magenta) is no grey and no jet over grey."""
    rgb = key.pixel_array.astype(int)
    ys, xs = np.nonzero((rgb[..., 0] == 255) & (rgb[..., 1] == 0) & (rgb[..., 2] == 255))
    assert len(ys) > 20, "no ring drawn"
    radius = np.hypot(ys - ys.mean(), xs - xs.mean())
    assert radius.min() > 0.7 * radius.max(), "the marker is not one ring"
    return float(ys.mean()), float(xs.mean())


@pytest.fixture(scope="module")
def lesion_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_study(tmp_path_factory.mktemp("key-image-study"))


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> Triage:
    return known_triage(tmp_path_factory.mktemp("key-image-models"))


@pytest.fixture(scope="module")
def result(known: Triage, lesion_study: Path) -> StudyResult:
    return triage_folder(lesion_study, known, model="pe-triage", version="3", ingest=INGEST, config=PACS)


def test_the_geometry_fails_a_wrong_crop_mapping() -> None:
    """The crop box is not the whole slice, and mapping the map over the whole slice instead of the box
    would put the lesion's peak far off the lesion: the tests below can tell the two apart."""
    y0, y1, x0, x1 = find_lung_box(chest(True), (SPACING, SPACING)).box
    assert (y1 - y0, x1 - x0) != (SIZE, SIZE)
    wrong = ((LESION[0] - y0) * SIZE / (y1 - y0), (LESION[1] - x0) * SIZE / (x1 - x0))
    assert np.hypot(wrong[0] - LESION[0], wrong[1] - LESION[1]) > 4 * RADIUS


def test_the_key_image_rings_the_evidence_peak_on_the_lesion(result: StudyResult) -> None:
    key = result.objects[1]
    assert key.SourceImageSequence[0].ReferencedSOPInstanceUID == f"1.2.3.4.5.{LESION_SLICE + 1}"
    y, x = ring_centre(key)
    assert np.hypot(y - LESION[0], x - LESION[1]) <= RADIUS / 2


def test_the_overlay_tints_the_lesion_and_leaves_the_rest_of_the_slice_grey(result: StudyResult) -> None:
    rgb = result.objects[1].pixel_array.astype(int)
    spread = rgb.max(axis=2) - rgb.min(axis=2)  # 0 on a grey pixel
    assert spread[lesion_mask()].mean() > 40
    far = np.zeros((SIZE, SIZE), bool)
    far[SIZE // 2 : -8, 8:100] = True  # body and air left of the left lung, far from the lesion
    assert spread[far].max() == 0


def test_the_key_image_with_its_overlay_passes_dciodvfy(result: StudyResult, tmp_path: Path) -> None:
    result.objects[1].save_as(tmp_path / "key.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "key.dcm") == []


@pytest.mark.parametrize("context", [0, 1])
def test_the_evidence_map_is_in_source_pixels_with_its_peak_on_the_lesion(lesion_study: Path, tmp_path: Path,
                                                                          context: int) -> None:
    """Through predict's own inputs, also for a 2.5-D model (the lesion reaches a slice from its neighbour)."""
    triage = known_triage(tmp_path, context)
    scored = triage.score_dicom(str(lesion_study), ingest=INGEST)
    top = int(np.argmax(scored.frame["p_pe"].to_numpy()))
    assert int(scored.frame["slice_index"][top]) == LESION_SLICE - context  # ties: the first of the slices that see it
    heat = triage.evidence(scored.inputs, top, stage=2, shape=(SIZE, SIZE))
    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32 and heat.min() >= 0 and heat.max() == pytest.approx(1)
    assert peak_on_lesion(heat, lesion_mask(), tolerance=2)
    y0, y1, x0, x1 = scored.inputs.boxes[scored.inputs.rows[top]]
    assert not heat[:y0].any() and not heat[y1:].any() and not heat[:, :x0].any() and not heat[:, x1:].any()


def test_a_crop_box_outside_the_slice_is_a_clear_error() -> None:
    with pytest.raises(PredictError, match="does not fit"):
        to_source(np.ones((4, 4), np.float32), (0, 80, 0, 40), (64, 64))  # type: ignore[arg-type]


def test_each_output_row_finds_its_own_input_whatever_the_order_of_the_series(lesion_study: Path, tmp_path: Path,
                                                                             known: Triage) -> None:
    """Two series: the output is ordered by content, the stack by pseudonyms (random per call: four
    calls, each order likely both ways); the input each row maps to gives that row's probability
    again, and the key image rings the lesion."""
    for path in lesion_study.glob("*.dcm"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    write_study(tmp_path, series="1.2.3.4.4", lesion=False, shift_hu=20)  # read first; other windows
    for _ in range(4):
        scored = known.score_dicom(str(tmp_path), ingest=INGEST)
        inputs = scored.inputs
        _, p_pe = known.score(inputs.stack, inputs.windows, inputs.series, inputs.position)  # in stack order
        assert np.allclose(p_pe[inputs.rows], scored.frame["p_pe"].to_numpy(), atol=1e-6)
        assert (inputs.position[inputs.rows] == scored.frame["slice_index"].to_numpy()).all()
    result = triage_folder(tmp_path, known, model="pe-triage", version="3", ingest=INGEST, config=PACS)
    assert result.objects[1].SourceImageSequence[0].ReferencedSOPInstanceUID == f"1.2.3.4.5.{LESION_SLICE + 1}"
    y, x = ring_centre(result.objects[1])
    assert np.hypot(y - LESION[0], x - LESION[1]) <= RADIUS / 2


def test_the_evidence_follows_the_row_map_not_the_stack_order(lesion_study: Path, known: Triage) -> None:
    """The same inputs with the stack rotated by one (and the row map with it) give the same map."""
    scored = known.score_dicom(str(lesion_study), ingest=INGEST)
    top = int(np.argmax(scored.frame["p_pe"].to_numpy()))
    inputs = scored.inputs
    rotated = replace(inputs, stack=np.roll(inputs.stack, 1, axis=0), series=np.roll(inputs.series, 1),
                      position=np.roll(inputs.position, 1), boxes=np.roll(inputs.boxes, 1, axis=0),
                      rows=(inputs.rows + 1) % len(inputs.stack))
    first = known.evidence(inputs, top, stage=2, shape=(SIZE, SIZE))
    assert peak_on_lesion(first, lesion_mask(), tolerance=2)
    assert np.allclose(known.evidence(rotated, top, stage=2, shape=(SIZE, SIZE)), first, atol=1e-5)
