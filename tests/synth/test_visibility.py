"""Slices are labelled as a radiologist marks them, and lesion presets change only the lesions."""

from __future__ import annotations

import csv
import dataclasses
import json
import typing
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pe_triage import schema
from pe_triage.config import ConfigError, LesionPresetName, LesionVisibility, SynthConfig, parse_config
from pe_triage.schema import Label, Tissue
from pe_triage.synth import cohort_overview, generate_cohort
from pe_triage.synth.anatomy import OTHER_KINDS
from pe_triage.synth.patient import LESION_PRESETS, add_emboli, add_other_disease, draw_anatomy
from pe_triage.synth.phantom import RenderedSlice

DEFAULT = LesionVisibility()
#: minima well above a 128 px grid's pixel (6-13 mm²), so that slivers occur on a small cohort
STRICT = LesionVisibility(pe=20.0, consolidation=300.0, ggo=300.0, nodule=60.0, effusion=300.0)


def _slice(spacing: float = 1.0, **boxes: tuple[slice, slice]) -> RenderedSlice:
    """A 32 px lung slice with each named lesion kind painted over a box of pixels."""
    tissue = np.full((32, 32), Tissue.LUNG, np.uint8)
    kind = np.zeros((32, 32), np.uint8)
    for name, box in boxes.items():
        if name == "pe":
            tissue[box] = Tissue.PE
        else:
            tissue[box] = Tissue.OTHER_LESION
            kind[box] = OTHER_KINDS.index(name) + 1
    return RenderedSlice(np.zeros((32, 32), np.float32), tissue, kind, spacing)


def test_minima_name_every_lesion_kind() -> None:
    assert [f.name for f in dataclasses.fields(LesionVisibility)] == ["pe", *OTHER_KINDS]


def test_a_sliver_is_indeterminate_a_cross_section_gets_its_label() -> None:
    assert _slice().label(DEFAULT) is Label.WNL and _slice().areas_mm2 == {}
    sliver = _slice(pe=np.s_[5, 5:7])  # 2 mm²
    assert sliver.areas_mm2 == {"pe": 2.0} and sliver.label(DEFAULT) is Label.INDETERMINATE
    assert sliver.lesion == "pe"
    assert _slice(pe=np.s_[5:8, 5:8]).label(DEFAULT) is Label.PE  # 9 mm²
    assert _slice(nodule=np.s_[5:7, 5:8]).label(DEFAULT) is Label.INDETERMINATE  # 6 mm² < 7
    assert _slice(nodule=np.s_[5:8, 5:8]).label(DEFAULT) is Label.OTHER  # 9 mm²


def test_each_kind_has_its_own_minimum() -> None:
    patch = np.s_[2:7, 2:8]  # 30 mm²: a consolidation, but too faint a ground glass patch
    assert _slice(consolidation=patch).label(DEFAULT) is Label.OTHER
    assert _slice(ggo=patch).label(DEFAULT) is Label.INDETERMINATE
    assert _slice(effusion=patch).label(DEFAULT) is Label.INDETERMINATE
    two = _slice(ggo=patch, effusion=np.s_[20:25, 20:26])
    assert two.areas_mm2 == {"ggo": 30.0, "effusion": 30.0} and two.label(DEFAULT) is Label.INDETERMINATE


def test_visible_pe_wins_and_a_pe_sliver_yields_to_visible_disease() -> None:
    big_nodule = np.s_[20:26, 20:26]
    assert _slice(pe=np.s_[5:8, 5:8], nodule=big_nodule).label(DEFAULT) is Label.PE
    mixed = _slice(pe=np.s_[5, 5], nodule=big_nodule)
    assert mixed.label(DEFAULT) is Label.OTHER and mixed.lesion == "pe"  # the dominant kind stays PE


def test_pixel_spacing_scales_the_area() -> None:
    box = np.s_[5, 5:7]  # two pixels
    assert _slice(0.7, pe=box).label(DEFAULT) is Label.INDETERMINATE  # 0.98 mm²
    assert _slice(2.0, pe=box).areas_mm2 == {"pe": 8.0}
    assert _slice(2.0, pe=box).label(DEFAULT) is Label.PE
    assert _slice(2.0, pe=box).label(dataclasses.replace(DEFAULT, pe=10.0)) is Label.INDETERMINATE


@pytest.fixture(scope="module")
def strict_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("strict")
    generate_cohort(out, SynthConfig(sites=1, patients_per_site=6, slices=12, size=128, seed=3,
                                     min_visible_area_mm2=STRICT))
    return out


def test_truth_labels_follow_the_masks_and_minima(strict_cohort: Path) -> None:
    out = strict_cohort
    patients = json.loads((out / "truth" / "cohort.json").read_text())["sites"][0]["patients"]
    spacing = {p["patient_id"]: p["pixel_spacing_mm"] for p in patients}
    rows = pq.read_table(out / "truth" / "site-a.parquet").to_pylist()
    labels = [r[schema.LABEL] for r in rows]
    assert labels.count("indeterminate") > 0 and labels.count("pe") > 0 and labels.count("other") > 0
    min_other = min(STRICT.consolidation, STRICT.ggo, STRICT.nodule, STRICT.effusion)
    for r in rows:
        tissue = np.frombuffer(r[schema.T_TISSUE], np.uint8)
        mask = np.frombuffer(r[schema.T_MASK], np.uint8).astype(bool)
        pixel = spacing[r[schema.M_PATIENT_ID]] ** 2
        pe = np.count_nonzero(tissue == Tissue.PE) * pixel
        other = np.count_nonzero(tissue == Tissue.OTHER_LESION) * pixel
        label = r[schema.LABEL]
        assert (label == "wnl") == (not mask.any()) == (pe + other == 0)
        assert (label == "pe") == (pe >= STRICT.pe)
        if label == "pe":
            assert r[schema.T_LESION] == "pe"
            assert np.array_equal(mask, tissue == Tissue.PE)  # the clot the label is about, not a lesion beside it
        if label == "other":
            assert other >= min_other
        if label == "indeterminate" and r[schema.T_LESION] == "pe" and other == 0:
            assert 0 < pe < STRICT.pe


def test_indeterminate_slices_are_listed_and_counted(strict_cohort: Path) -> None:
    out = strict_cohort
    truth = {r[schema.M_SOP_UID]: r[schema.LABEL] for r in pq.read_table(out / "truth" / "site-a.parquet").to_pylist()}
    with (out / "sites" / "site-a" / "labels.csv").open(newline="") as f:
        slice_rows = [r for r in csv.DictReader(f) if not r[schema.M_DIAGNOSIS]]  # site-a lists slices by SOP UID
    assert {r[schema.M_SOP_UID]: r[schema.M_LABEL] for r in slice_rows} == {
        uid: label for uid, label in truth.items() if label != "wnl"}
    cohort = json.loads((out / "truth" / "cohort.json").read_text())
    patients = cohort["sites"][0]["patients"]
    assert sum(p["indeterminate_slices"] for p in patients) == list(truth.values()).count("indeterminate")
    assert cohort["lesions"] == "realistic" and cohort["min_visible_area_mm2"] == dataclasses.asdict(STRICT)


def test_conspicuous_lesions_are_central_or_lobar_clots_and_large_lesions() -> None:
    real, plain = LESION_PRESETS["realistic"], LESION_PRESETS["conspicuous"]
    for seed in range(4):
        rng = np.random.default_rng(seed)
        normal = draw_anatomy(rng, female=False)
        z = normal.z(0.5) + (np.arange(24) - 11.5) * 3.0
        sick = add_emboli(normal, rng, z, (4, 12), 1.5, plain)
        sick = add_other_disease(sick, rng, z, 8, 1.5, plain)
        assert sick.emboli and all(e.location in ("central", "lobar") for e in sick.emboli)
        for e in sick.emboli:
            assert sick.tubes.r0[list(e.pieces)].min() >= 3.5  # never runs on into a segmental artery
            assert e.fraction >= plain.clot_fraction[0] > real.clot_fraction[0]
        for b in sick.blobs:
            if b.kind == "nodule":
                assert b.radii[2] >= plain.nodule_r[0] > real.nodule_r[0]
            if b.kind == "ggo":
                assert b.hu >= plain.ggo_hu[0] > real.ggo_hu[0]
        for eff in sick.effusions:
            assert eff.thickness >= plain.effusion_mm[0] * normal.scale > real.effusion_mm[0] * normal.scale


def test_the_cohort_records_its_preset(tmp_path: Path) -> None:
    config = SynthConfig(sites=1, patients_per_site=3, slices=10, size=64, seed=5, lesions="conspicuous")
    summary = generate_cohort(tmp_path, config)
    cohort = json.loads((tmp_path / "truth" / "cohort.json").read_text())
    assert cohort["lesions"] == "conspicuous" and cohort["config"]["lesions"] == "conspicuous"
    assert cohort["min_visible_area_mm2"] == dataclasses.asdict(DEFAULT)
    emboli = [e for p in cohort["sites"][0]["patients"] for e in p["emboli"]]
    assert emboli and {e["location"] for e in emboli} <= {"central", "lobar"}
    overview = cohort_overview(summary)
    assert overview["lesions"] == "conspicuous"
    assert sum(overview["slices_per_label"].values()) == 30
    assert set(overview["slices_per_label"]) == {label.value for label in Label}


def test_an_unknown_preset_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"SynthConfig.lesions: 'obvious' is not one of \['realistic', 'conspicuous'\]"):
        SynthConfig(lesions="obvious")  # type: ignore[arg-type]


def test_every_preset_name_has_a_preset() -> None:
    assert set(LESION_PRESETS) == set(typing.get_args(LesionPresetName))


def test_preset_and_minima_come_from_yaml() -> None:
    config = parse_config("synth:\n  lesions: conspicuous\n  min_visible_area_mm2: {pe: 10, ggo: 80}\n").synth
    assert config.lesions == "conspicuous"
    assert config.min_visible_area_mm2 == dataclasses.replace(DEFAULT, pe=10.0, ggo=80.0)
