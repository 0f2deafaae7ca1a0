"""The slices pixel encoding round-trips every int16 value and rejects a wrong size; the stage table is consistent."""

from __future__ import annotations

import numpy as np
import pytest

from pe_triage import schema as S


def test_hu_planes_round_trip_every_int16_value() -> None:
    hu = np.arange(-32768, 32768, dtype=np.int16).reshape(256, 256)
    planes = S.encode_hu(hu)
    assert planes.dtype == np.uint8 and planes.size == 2 * hu.size
    np.testing.assert_array_equal(S.decode_hu(planes.tobytes(), 256, 256), hu)


def test_hu_planes_separate_low_and_high_bytes() -> None:
    hu = np.array([[-1000, 40]], np.int16)  # -1000 = 0xFC18, 40 = 0x0028
    assert list(S.encode_hu(hu)) == [0x18, 0x28, 0xFC, 0x00]


def test_decode_refuses_a_wrong_size() -> None:
    with pytest.raises(ValueError, match="expected 8 for 2x2"):
        S.decode_hu(b"\x00" * 6, 2, 2)


def test_schema_names_every_column_once() -> None:
    names = S.SLICES_SCHEMA.names
    assert len(names) == len(set(names)) and names[-1] == S.HU
    assert set(S.SLICES_META_COLUMNS) == set(names) - {S.HU}


def test_windows_column_round_trip_without_copy_and_with_offsets() -> None:
    stack = np.random.default_rng(0).integers(0, 256, (5, 2, 4, 4), dtype=np.uint8)
    column = S.windows_array(stack)
    field = S.windows_schema(2, 4).field(S.WINDOWS)
    assert column.type == field.type and S.windows_shape(field) == (2, 4, 4)
    np.testing.assert_array_equal(S.windows_stack(column, (2, 4, 4)), stack)
    np.testing.assert_array_equal(S.windows_stack(column.slice(2, 2), (2, 4, 4)), stack[2:4])
    import pyarrow as pa

    chunked = pa.chunked_array([column.slice(0, 2), column.slice(2, 3)])
    np.testing.assert_array_equal(S.windows_stack(chunked, (2, 4, 4)), stack)


def test_the_stage_table_splits_each_stages_labels_in_two() -> None:
    definite = {S.Label.WNL.value, S.Label.OTHER.value, S.Label.PE.value}
    assert list(S.STAGES) == [1, 2]
    for number, stage in S.STAGES.items():
        assert stage.number == number and stage.name == f"stage{number}"
        assert stage.positive_labels and stage.negative_labels
        assert not set(stage.positive_labels) & set(stage.negative_labels) and set(stage.labels) <= definite
    assert set(S.STAGES[1].labels) == definite  # stage 1 sees every slice with a definite label
    assert set(S.STAGES[2].labels) == set(S.STAGES[1].positive_labels)  # stage 2 sees what stage 1 calls disease
    assert [s.column for s in S.STAGES.values()] == [S.P_DISEASE, S.P_PE] == S.PREDICTION_COLUMNS[-2:]
