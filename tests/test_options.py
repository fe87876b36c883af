"""options.py as pure units: eager validation of every set_processing option and backend defaults."""

from __future__ import annotations

import pytest

import streamproc as sp
from streamproc.batching import BatchSize
from streamproc.options import ProcessingOptions

VALID = [
    ("backend", "simple", "simple"),
    ("backend", "multiprocessing", "multiprocessing"),
    ("backend", None, None),
    ("num_cpu_workers", 1, 1),
    ("num_cpu_workers", 8, 8),
    ("num_cpu_workers", None, None),
    ("num_gpu_workers", 0, 0),
    ("num_gpu_workers", 2, 2),
    ("gpu_worker_devices", ["cuda:0", "cuda:1"], ("cuda:0", "cuda:1")),
    ("gpu_worker_devices", ("cpu",), ("cpu",)),
    ("gpu_worker_devices", ["cuda", "mps"], ("cuda", "mps")),
    ("gpu_worker_devices", None, None),
    ("deterministic", False, False),
    ("deterministic", True, True),
    ("batch_size", 32, BatchSize(32)),
    ("batch_size", "4096 tokens", BatchSize(4096, "tokens")),
    ("batch_size", None, None),
    ("batch_by", "text", "text"),
    ("batch_by", len, len),
    ("batch_by", None, None),
    ("show_progress", True, True),
    ("autocast", True, True),
    ("autocast", False, False),
    ("autocast", "bfloat16", "bfloat16"),
    ("autocast", "float16", "float16"),
    ("autocast", None, None),
    ("process_start_method", "spawn", "spawn"),
    ("process_start_method", "forkserver", "forkserver"),
    ("process_start_method", "fork", "fork"),
    ("task_size", 1, 1),
    ("task_size", 5000, 5000),
    ("torch_threads", 1, 1),
    ("torch_threads", 4, 4),
    ("torch_threads", None, None),
]


@pytest.mark.parametrize(("name", "value", "stored"), VALID)
def test_valid_values_are_stored(name, value, stored):
    stream = sp.from_iterable([]).set_processing(**{name: value})
    assert getattr(stream.options, name) == stored


def test_torch_dtype_autocast_is_accepted():
    torch = pytest.importorskip("torch")
    assert sp.from_iterable([]).set_processing(autocast=torch.float16).options.autocast is torch.float16


INVALID = [
    ("backend", "Simple"),
    ("backend", "dask"),
    ("backend", 1),
    ("num_cpu_workers", 0),
    ("num_cpu_workers", -1),
    ("num_cpu_workers", 1.5),
    ("num_cpu_workers", "2"),
    ("num_cpu_workers", True),
    ("num_gpu_workers", -1),
    ("num_gpu_workers", 1.0),
    ("num_gpu_workers", False),
    ("gpu_worker_devices", "cuda:0"),  # a string, not a list of them
    ("gpu_worker_devices", []),
    ("gpu_worker_devices", ["gpu0"]),
    ("gpu_worker_devices", ["cuda:x"]),
    ("gpu_worker_devices", [0]),
    ("gpu_worker_devices", 5),
    ("gpu_worker_devices", iter(["cpu"])),
    ("deterministic", "yes"),
    ("deterministic", 1),
    ("deterministic", None),
    ("batch_size", 0),
    ("batch_size", -4),
    ("batch_size", "eight"),
    ("batch_size", "8 bananas"),
    ("batch_size", 2.5),
    ("batch_size", True),
    ("batch_by", 3),
    ("batch_by", ["text"]),
    ("show_progress", "no"),
    ("show_progress", None),
    ("autocast", "int8"),
    ("autocast", 1),
    ("autocast", "torch.float16"),
    ("process_start_method", "thread"),
    ("process_start_method", "SPAWN"),
    ("task_size", 0),
    ("task_size", -10),
    ("task_size", 10.0),
    ("task_size", "100"),
    ("torch_threads", 0),
    ("torch_threads", -2),
    ("torch_threads", 2.0),
    ("torch_threads", "2"),
    ("torch_threads", True),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_values_raise_value_error_naming_the_option(name, value):
    stream = sp.from_iterable([])
    with pytest.raises(ValueError) as info:
        stream.set_processing(**{name: value})
    assert name in str(info.value)
    assert stream.options == ProcessingOptions()


def test_validation_is_eager_and_reads_nothing():
    pulled = []
    stream = sp.from_iterable(pulled.append(i) or i for i in range(3))
    with pytest.raises(ValueError, match="num_cpu_workers"):
        stream.set_processing(num_cpu_workers=0)
    assert pulled == []


def test_unknown_option_raises_type_error_naming_it():
    with pytest.raises(TypeError, match="num_workers"):
        sp.from_iterable([]).set_processing(num_workers=2)
    with pytest.raises(TypeError, match="bogus, other"):
        sp.from_iterable([]).set_processing(other=1, bogus=2, task_size=3)


def test_one_bad_option_applies_none():
    stream = sp.from_iterable([]).set_processing(task_size=7)
    with pytest.raises(ValueError):
        stream.set_processing(task_size=3, num_cpu_workers=0)
    assert stream.options.task_size == 7


def test_defaults():
    options = ProcessingOptions()
    assert options.deterministic is True
    assert options.show_progress is False
    assert options.autocast is None
    assert options.batch_size is None and options.task_size is None
    assert options.changed_fields() == {}


@pytest.mark.parametrize(
    ("options", "backend"),
    [
        ({}, "simple"),
        ({"num_cpu_workers": 1}, "simple"),
        ({"num_gpu_workers": 0}, "simple"),
        ({"num_cpu_workers": 2}, "multiprocessing"),
        ({"num_gpu_workers": 1}, "multiprocessing"),
        ({"gpu_worker_devices": ["cpu"]}, "multiprocessing"),
        ({"gpu_worker_devices": ["cuda:0"], "num_gpu_workers": 0}, "simple"),
        ({"num_cpu_workers": 4, "backend": "simple"}, "simple"),
        ({"backend": "multiprocessing"}, "multiprocessing"),
        ({"backend": "multiprocessing", "num_cpu_workers": 1}, "multiprocessing"),
    ],
)
def test_effective_backend(options, backend):
    assert ProcessingOptions().updated(**options).effective_backend == backend
    assert sp.from_iterable([]).set_processing(**options).plan().options.effective_backend == backend


@pytest.mark.parametrize(
    ("options", "count"),
    [
        ({}, 0),
        ({"num_gpu_workers": 2}, 2),
        ({"gpu_worker_devices": ["cuda:0", "cuda:1"]}, 2),
        ({"gpu_worker_devices": ["cpu"], "num_gpu_workers": 3}, 3),
    ],
)
def test_effective_gpu_workers(options, count):
    assert ProcessingOptions().updated(**options).effective_gpu_workers == count


def test_changed_fields_lists_only_what_differs():
    options = ProcessingOptions().updated(task_size=3, deterministic=True, show_progress=True)
    assert options.changed_fields() == {"task_size": 3, "show_progress": True}


@pytest.mark.parametrize(
    ("options", "threads"),
    [
        ({}, 1),  # deterministic: the count workers run with, in every backend
        ({"deterministic": False}, None),  # leave torch's own count
        ({"torch_threads": 3}, 3),
        ({"torch_threads": 3, "deterministic": False}, 3),
        ({"torch_threads": 1, "deterministic": False}, 1),
    ],
)
def test_forward_threads(options, threads):
    assert ProcessingOptions().updated(**options).forward_threads == threads


def test_torch_threads_accepts_counts_above_the_machine():
    """How many threads the machine can run is a machine check: never refused here."""
    assert sp.from_iterable([]).set_processing(torch_threads=4096).options.torch_threads == 4096
