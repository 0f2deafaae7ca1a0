"""HU windows: configuration forms, the uint8 storage map and the zero-centred network input."""

from __future__ import annotations

import numpy as np
import pytest

from pe_triage.windows import PRESETS, Window, uint8_to_centred, window_to_uint8


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
