"""HU windows: configuration forms, the uint8 storage map, the zero-centred network input, the stored
form and picking a model's channels out of a stack."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pe_triage.windows import (
    PRESETS,
    Window,
    context_stack,
    neighbour_rows,
    uint8_to_centred,
    window_channels,
    window_to_uint8,
)


def test_study_windows_and_clinical_presets() -> None:
    assert (PRESETS["vascular"].lo, PRESETS["vascular"].hi) == (0, 650)
    assert (PRESETS["mediastinal"].lo, PRESETS["mediastinal"].hi) == (40, 400)
    assert (PRESETS["lung"].lo, PRESETS["lung"].hi) == (-400, 1500)
    assert (PRESETS["clinical_lung"].lo, PRESETS["clinical_lung"].hi) == (-1350, 150)
    assert (PRESETS["clinical_pe"].level, PRESETS["clinical_pe"].width) == (100, 700)


def test_uint8_map_ends_and_clipping() -> None:
    w = Window("w", -100, 155)  # 1 HU per step
    hu = np.array([-2000, -100, -99.6, 0, 155, 3000], np.float32)
    assert list(window_to_uint8(hu, w)) == [0, 0, 0, 100, 255, 255]


def test_into_preallocated_output() -> None:
    out = np.full((2, 2), 7, np.uint8)
    window_to_uint8(np.array([[0, 650], [325, -5]], np.float32), PRESETS["vascular"], out=out)
    assert out.tolist() == [[0, 255], [128, 0]]


def test_centred_network_input() -> None:
    x = uint8_to_centred(np.array([0, 255, 127, 128], np.uint8))
    assert x.dtype == np.float32 and x[0] == -1 and x[1] == 1 and abs(x[2] + x[3]) < 1e-2


def test_bad_window_is_named() -> None:
    with pytest.raises(ValueError, match="'broken'"):
        Window("broken", 10, 10)


def test_stored_form_round_trips_to_the_same_json() -> None:
    assert all(Window.from_dict(w.to_dict()) == w for w in PRESETS.values())
    stored = [{"name": "vascular", "lo": 0, "hi": 650}, {"name": "lung", "lo": -400.0, "hi": 1500.0}]
    assert json.dumps([Window.from_dict(d).to_dict() for d in stored]) == json.dumps(stored)  # what model.json keeps


def test_channels_are_picked_by_name_in_the_order_wanted() -> None:
    available = [PRESETS["vascular"], PRESETS["mediastinal"], PRESETS["lung"]]
    assert window_channels(available, ["lung", "vascular"]) == [2, 0]
    assert window_channels(available, [PRESETS["mediastinal"], Window("lung", -400.0, 1500.0)]) == [1, 2]


@pytest.mark.parametrize(("wanted", "message"), [
    (["vascular", "soft"], "unknown window(s) ['soft']; available windows: ['vascular', 'lung']"),
    ([Window("lung", -1000, 1600)], "window 'lung' is defined differently: -1000..1600 HU wanted, -400..1500 HU available"),
    (["lung", "lung"], "a window is wanted twice: ['lung', 'lung']"),
    ([], "non-empty list"),
    ("lung", "non-empty list"),
])
def test_the_channel_picker_names_what_is_missing_or_differs(wanted: list[str | Window], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        window_channels([PRESETS["vascular"], PRESETS["lung"]], wanted)


# ------------------------------------------------------------------------------------ z-context
def test_neighbours_stay_in_their_series_in_z_order_and_replicate_the_ends() -> None:
    series = np.array(["b", "a", "a", "b", "a", "c"])
    position = np.array([7, 2, 0, 3, 1, 5])  # a: rows 2, 4, 1 along z; b: rows 3, 0; c: row 5
    rows = neighbour_rows(series, position, 1)
    assert rows.tolist() == [[3, 0, 0], [4, 1, 1], [2, 2, 4], [3, 3, 0], [2, 4, 1], [5, 5, 5]]
    wide = neighbour_rows(series, position, 2)
    assert wide[4].tolist() == [2, 2, 4, 1, 1] and wide[:, 1:4].tolist() == rows.tolist()
    assert neighbour_rows(series, position, 0).tolist() == [[i] for i in range(6)]


def test_context_stack_is_window_major_and_picks_channels_before_stacking() -> None:
    stack = np.zeros((3, 2, 1, 1), np.uint8)
    stack[:, 0, 0, 0], stack[:, 1, 0, 0] = [10, 11, 12], [20, 21, 22]  # window 0 / window 1 of slices 0..2
    rows = np.array([[0, 1, 2], [1, 2, 2]])
    assert context_stack(stack, rows)[:, :, 0, 0].tolist() == [[10, 11, 12, 20, 21, 22], [11, 12, 12, 21, 22, 22]]
    assert context_stack(stack, rows, [1])[:, :, 0, 0].tolist() == [[20, 21, 22], [21, 22, 22]]
    assert context_stack(stack, rows[:, 1:2], [1, 0])[:, :, 0, 0].tolist() == [[21, 11], [22, 12]]


def test_bad_context_requests_are_named() -> None:
    with pytest.raises(ValueError, match="context must be >= 0"):
        neighbour_rows(np.array(["a"]), np.array([0]), -1)
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        neighbour_rows(np.array(["a", "b"]), np.array([0]), 1)
    with pytest.raises(ValueError, match=r"rows must be \[N, slices\]"):
        context_stack(np.zeros((2, 1, 1, 1), np.uint8), np.array([0, 1]))
