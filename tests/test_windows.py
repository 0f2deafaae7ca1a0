"""HU windows: configuration forms, the uint8 storage map, the zero-centred network input, the stored
form and picking a model's channels out of a stack."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pe_triage.windows import PRESETS, Window, uint8_to_centred, window_channels, window_to_uint8


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
