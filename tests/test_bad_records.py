"""Bad records and bad outputs fail the same way on every backend, with a readable error.

Fakes that travel to workers are at module level (spawn imports this module in each worker),
and this module imports neither torch nor pyarrow at the top, so that spawned workers start fast.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import streamproc as sp
from tests.utils import collect_until_error, stage_notes

#: The multiprocessing configurations of the equivalence checks below.
START_METHODS = ["fork", "spawn"]


def mp_options(start_method: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "multiprocessing", "num_cpu_workers": 2, "process_start_method": start_method, **extra}


# -- forward returned a scalar (0-d output) and no postprocess was given ----------------------


def to_tensor(records: list[int]) -> Any:
    import torch

    return torch.tensor(records, dtype=torch.float32)


def batch_sum(batch: Any) -> Any:
    """A forward that reduces its batch to a 0-d tensor (a loss, say)."""
    return batch.sum()


def batch_sum_and_rows(batch: Any) -> Any:
    return {"row": batch + 1, "loss": batch.sum()}


GPU_WORKER = {"backend": "multiprocessing", "num_cpu_workers": 2, "num_gpu_workers": 1, "gpu_worker_devices": ["cpu"]}


SCALAR_MESSAGE = (
    "forward returned a 0-d output (dtype float32) for a batch of 4 records: "
    "pass a postprocess function to map_gpu to match outputs to records"
)
SCALAR_STAGE = "stage 1 (map_gpu(to_tensor, batch_sum, batch_size='4 records'))"


def test_scalar_forward_output_without_postprocess_names_the_batch(backend_options):
    pytest.importorskip("torch")
    stream = sp.from_iterable(range(10)).map_gpu(to_tensor, batch_sum, batch_size=4).set_processing(**backend_options)
    _, exc = collect_until_error(stream)
    assert type(exc) is ValueError, repr(exc)
    assert str(exc) == SCALAR_MESSAGE
    assert stage_notes(exc) == [f"streamproc: raised in {SCALAR_STAGE}, postprocess"]


def test_scalar_forward_output_from_a_gpu_worker_names_the_batch():
    pytest.importorskip("torch")
    stream = sp.from_iterable(range(10)).map_gpu(to_tensor, batch_sum, batch_size=4).set_processing(**GPU_WORKER)
    _, exc = collect_until_error(stream)
    assert type(exc) is ValueError, repr(exc)
    assert str(exc) == SCALAR_MESSAGE
    assert stage_notes(exc) == [f"streamproc: raised in {SCALAR_STAGE}, postprocess"]


def test_scalar_under_a_key_of_the_outputs_is_named(backend_options):
    pytest.importorskip("torch")
    stream = sp.from_iterable(range(6)).map_gpu(to_tensor, batch_sum_and_rows, batch_size=3).set_processing(**backend_options)
    _, exc = collect_until_error(stream)
    assert type(exc) is ValueError, repr(exc)
    assert "forward returned a 0-d output (dtype float32) as outputs['loss'] for a batch of 3 records" in str(exc)


@pytest.mark.parametrize(
    ("outputs", "what"),
    [
        (2.5, "a 0-d output (float 2.5)"),
        (None, "a 0-d output (None)"),
        ((["a", "b"], 7), "a 0-d output (int 7) as outputs[1]"),
        ({"a": [1, 2], "b": [1]}, "outputs of different lengths per key {'a': 2, 'b': 1}"),
    ],
)
def test_default_postprocess_of_outputs_without_one_row_per_record(outputs, what):
    from streamproc.ops import default_postprocess

    with pytest.raises(ValueError) as info:
        default_postprocess(["r1", "r2"], outputs)
    assert str(info.value) == (
        f"forward returned {what} for a batch of 2 records: pass a postprocess function to map_gpu to match outputs to records"
    )


def test_split_rows_of_a_0d_tensor_raises_value_error():
    torch = pytest.importorskip("torch")
    from streamproc.gpu import split_rows

    with pytest.raises(ValueError, match=r"forward returned a 0-d output \(dtype int64\): it has no rows to split"):
        split_rows(torch.tensor(3))
    assert split_rows(torch.tensor([3])) == [3]  # 1-d of one row: still one row per record
    assert [row.tolist() for row in split_rows(torch.ones(2, 3))] == [[1.0] * 3] * 2


# -- records that are not dicts, written to parquet ----------------------------------------------


def nest(record: Any, depth: int = 5_000) -> Any:
    """``record`` wrapped in ``depth`` lists (built iteratively: no recursion here)."""
    for _ in range(depth):
        record = [record]
    return record


NOT_DICTS = {
    "none-after-a-dict": ([{"a": 1}, None, {"a": 2}], "got NoneType None (record 1 of a chunk of 3)"),
    "only-none": ([None, None], "got NoneType None (record 0 of a chunk of 2)"),
    "int-first": ([7, {"a": 1}], "got int 7 (record 0 of a chunk of 2)"),
    "list": ([{"a": 1}, [1, 2]], "got list [1, 2] (record 1 of a chunk of 2)"),
}


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "unordered"])
@pytest.mark.parametrize(("records", "named"), NOT_DICTS.values(), ids=NOT_DICTS.keys())
def test_write_parquet_of_non_dict_records_raises_schema_error(backend_options, deterministic, records, named, tmp_path):
    # deterministic=False with multiprocessing writes the parts in the workers (another path).
    stream = sp.from_iterable(records).set_processing(deterministic=deterministic, **backend_options)
    with pytest.raises(sp.SchemaError) as info:
        stream.write_parquet(tmp_path / "out")
    assert f"write_parquet needs dict records, {named}: map records to dicts before writing them" in str(info.value)


def test_schema_error_of_a_deeply_nested_record_is_readable():
    from streamproc.io.parquet_writer import records_to_table

    with pytest.raises(sp.SchemaError, match=re.escape("got list [[[[[[[...]]]]]]] (record 0 of a chunk of 1)")):
        records_to_table([nest(1)])


# -- records nested deeper than the default recursion limit -------------------------------------

#: Deeper than the default recursion limit (1,000) lets pickle go; fine for the simple backend.
DEEP = 5_000
#: Deeper than any backend that pickles records can take (see DEEP_MESSAGE_RECURSION_LIMIT).
TOO_DEEP = 300_000


def nest_deep(x: int) -> dict[str, Any]:
    return {"x": x, "v": nest(x, DEEP)}


def nest_too_deep(x: int) -> dict[str, Any]:
    return {"x": x, "v": nest(x, TOO_DEEP) if x == 3 else x}


def unnest(value: Any) -> tuple[int, Any]:
    """``(depth, innermost value)`` of a list nesting, without recursion (``==`` would recurse)."""
    depth = 0
    while isinstance(value, list) and len(value) == 1:
        value, depth = value[0], depth + 1
    return depth, value


def flat(records: list[dict[str, Any]]) -> list[tuple[int, tuple[int, Any]]]:
    return [(r["x"], unnest(r["v"])) for r in records]


@pytest.mark.parametrize("start_method", START_METHODS)
def test_records_nested_5000_deep_made_in_workers_equal_the_simple_backend(start_method):
    stream = sp.from_iterable(range(12)).map(nest_deep).set_processing(task_size=4)
    expected = flat(stream.to_list())
    assert expected == [(x, (DEEP, x)) for x in range(12)]
    assert flat(stream.set_processing(**mp_options(start_method)).to_list()) == expected


@pytest.mark.parametrize("start_method", START_METHODS)
def test_records_nested_5000_deep_sent_to_workers_equal_the_simple_backend(start_method):
    # The records cross main -> worker (the feeder pickles tasks) and back.
    stream = sp.from_iterable([nest_deep(x) for x in range(12)]).set_processing(task_size=4)
    expected = flat(stream.to_list())
    assert flat(stream.set_processing(**mp_options(start_method)).to_list()) == expected


@pytest.mark.parametrize("start_method", START_METHODS)
def test_record_too_deep_to_pickle_fails_the_same_way_under_every_start_method(start_method):
    stream = sp.from_iterable(range(8)).map(nest_too_deep).set_processing(task_size=4, **mp_options(start_method))
    outputs, exc = collect_until_error(stream)
    assert type(exc) is sp.SerializationError, repr(exc)
    assert "an output of task 0 cannot be pickled" in str(exc)
    assert "nested too deeply to pickle even with a recursion limit of 100000" in str(exc)
    assert outputs == []


def test_deep_message_round_trip_restores_the_recursion_limit():
    import sys
    import threading

    from streamproc.execution.serialization import DEEP_MESSAGE_THREAD_NAME, dumps_message, loads_message

    limit = sys.getrecursionlimit()
    errors: list[BaseException] = []

    def send_many() -> None:  # threads pickling deep messages at once, as the feeders do
        try:
            for x in range(5):
                assert flat([loads_message(dumps_message(nest_deep(x)))]) == [(x, (DEEP, x))]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send_many, name=f"test-deep-sender-{i}") for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert sys.getrecursionlimit() == limit
    assert not [t for t in threading.enumerate() if t.name == DEEP_MESSAGE_THREAD_NAME]
