"""from_pandas / to_pandas round trips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import streamproc as sp
from tests.utils import assert_same_as_simple, is_deterministic


def in_source_order(df: pd.DataFrame, config: dict) -> pd.DataFrame:
    """``df`` as it is with a deterministic config; sorted back by ``i`` otherwise."""
    return df if is_deterministic(config) else df.sort_values("i").reset_index(drop=True)


def sample_frame(rows: int = 5) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "i": np.arange(rows, dtype=np.int64),
            "f": [np.nan if k % 3 == 1 else k / 2 for k in range(rows)],
            "s": [None if k % 4 == 2 else f"text {k}" for k in range(rows)],
            "b": [k % 2 == 0 for k in range(rows)],
            "t": pd.to_datetime([None if k == 3 else f"2024-01-{k % 28 + 1:02d}" for k in range(rows)]),
            "o": pd.Series([[k] * (k % 3) if k != 4 else None for k in range(rows)], dtype=object),
        }
    )


@pytest.mark.parametrize("task_size", [1, 2, 1000])
def test_round_trip_with_nulls(backend_options, task_size):
    df = sample_frame()
    out = sp.from_pandas(df).set_processing(task_size=task_size, **backend_options).to_pandas()
    pd.testing.assert_frame_equal(in_source_order(out, backend_options), df)


def test_records_are_dicts_of_native_values(backend_options):
    df = pd.DataFrame({"a": [1, 2], "x": [0.5, np.nan], "s": ["u", None]})
    records = assert_same_as_simple(sp.from_pandas(df), **backend_options)
    assert records[0] == {"a": 1, "x": 0.5, "s": "u"}
    assert type(records[0]["a"]) is int and type(records[0]["x"]) is float
    assert np.isnan(records[1]["x"]) and pd.isna(records[1]["s"])


def test_non_default_index_is_ignored(backend_options):
    df = pd.DataFrame({"a": [10, 20, 30]}, index=[7, 3, 5])
    assert assert_same_as_simple(sp.from_pandas(df).map(lambda r: r["a"]), **backend_options) == [10, 20, 30]


def test_round_trip_through_ops(backend_options):
    df = sample_frame(50)
    out = (
        sp.from_pandas(df)
        .filter(lambda r: r["i"] % 5 != 0)
        .map(lambda r: {**r, "i2": r["i"] * 2})
        .set_processing(task_size=7, **backend_options)
        .to_pandas()
    )
    expected = df[df["i"] % 5 != 0].assign(i2=lambda d: d["i"] * 2).reset_index(drop=True)
    pd.testing.assert_frame_equal(in_source_order(out, backend_options), expected)


def test_empty_frame(backend_options):
    assert sp.from_pandas(pd.DataFrame({"a": []})).set_processing(**backend_options).to_list() == []


def test_frame_is_read_when_the_stream_runs():
    # from_pandas keeps a reference: rows come from the frame as it is when the stream runs.
    df = pd.DataFrame({"a": [1, 2]})
    stream = sp.from_pandas(df)
    assert repr(stream) == "Stream(from_pandas(<DataFrame 2 rows x 1 columns>))"
    assert stream.map(lambda r: r["a"]).to_list() == [1, 2]
