"""from_huggingface (Dataset, IterableDataset) and to_huggingface, on every backend against simple.

Skipped when ``datasets`` is not installed; ``tox -e datasets`` installs the extra and runs them.
"""

from __future__ import annotations

import sys

import pytest

import streamproc as sp
from tests.hang_guard import run_guarded
from tests.utils import assert_same_as_simple

datasets = pytest.importorskip("datasets")

RUN_TIMEOUT_S = 120


def guarded(fn):
    return run_guarded(fn, timeout_s=RUN_TIMEOUT_S, what="a datasets run")


def make_dataset(rows: int = 31):
    return datasets.Dataset.from_dict(
        {"id": list(range(rows)), "text": [f"t{i}" for i in range(rows)], "v": [[i, i] for i in range(rows)]}
    )


def upper(record):
    return {**record, "text": record["text"].upper()}


@pytest.mark.parametrize("task_size", [1, 4, 1000])
def test_dataset_matches_simple_and_list_of_dataset(backend_options, task_size):
    ds = make_dataset()
    stream = sp.from_huggingface(ds).map(upper).set_processing(task_size=task_size)
    out = guarded(lambda: assert_same_as_simple(stream, **backend_options))
    assert out == [upper(row) for row in ds]


def test_indices_mapping_is_applied(backend_options):
    ds = make_dataset().shuffle(seed=3).select(range(5, 25)).filter(lambda r: r["id"] % 2 == 0)
    stream = sp.from_huggingface(ds).set_processing(task_size=3)
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == list(ds)


def test_formatted_dataset_still_gives_python_records(backend_options):
    ds = make_dataset(5).with_format("numpy")
    assert guarded(lambda: assert_same_as_simple(sp.from_huggingface(ds), **backend_options)) == list(make_dataset(5))


def test_tasks_are_row_ranges_sliced_from_the_arrow_table():
    source = sp.from_huggingface(make_dataset(10)).source
    assert list(source.iter_tasks(4)) == [(0, 4), (4, 8), (8, 10)]
    assert source.locate((4, 8), row=1) == "from_huggingface, row 5"


def test_iterable_dataset(backend_options):
    ids = make_dataset().to_iterable_dataset(num_shards=3)
    stream = sp.from_huggingface(ids).map(upper).set_processing(task_size=5)
    assert guarded(lambda: assert_same_as_simple(stream, **backend_options)) == [upper(r) for r in ids]


def test_to_huggingface_round_trip(backend_options):
    ds = make_dataset()
    out = guarded(sp.from_huggingface(ds).map(upper).set_processing(task_size=4, **backend_options).to_huggingface)
    assert isinstance(out, datasets.Dataset)
    assert list(out) == [upper(row) for row in ds]
    assert out.column_names == ["id", "text", "v"]


def test_dataset_dict_and_other_types_raise():
    with pytest.raises(TypeError, match=r"needs one split.*\['train'\]"):
        sp.from_huggingface(datasets.DatasetDict({"train": make_dataset(2)}))
    with pytest.raises(TypeError, match=r"needs a datasets\.Dataset or datasets\.IterableDataset"):
        sp.from_huggingface([{"a": 1}])


def test_without_datasets_the_error_names_the_pip_command(monkeypatch):
    stream, ds = sp.from_iterable([{"a": 1}]), make_dataset(2)
    monkeypatch.setitem(sys.modules, "datasets", None)  # "import datasets" now raises ImportError
    with pytest.raises(ImportError, match=r"pip install streamproc\[datasets\]"):
        sp.from_huggingface(ds)
    with pytest.raises(ImportError, match=r"to_huggingface\(\).*pip install streamproc\[datasets\]"):
        stream.to_huggingface()


def test_dataset_under_forkserver(tmp_path):
    ds = make_dataset()
    ds.save_to_disk(str(tmp_path / "ds"))
    on_disk = datasets.load_from_disk(str(tmp_path / "ds")).shuffle(seed=1)  # memory-mapped, with indices
    options = {"backend": "multiprocessing", "num_cpu_workers": 2, "process_start_method": "forkserver"}
    assert guarded(lambda: assert_same_as_simple(sp.from_huggingface(on_disk).set_processing(task_size=4), **options)) == list(
        on_disk
    )
