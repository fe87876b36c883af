"""The test harness itself: shared fakes, output comparison and the leak check's probes."""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

import streamproc as sp
from tests.conftest import _live_children, _live_streamproc_threads
from tests.utils import (
    CountingSource,
    UserError,
    assert_records_equal,
    assert_same_as_simple,
    config_id,
    fn_raises,
    in_process_configs,
    is_simple,
    normalize,
    reads_ahead,
    runs_in_separate_processes,
    wait_for_condition,
)


def test_fn_raises_matches_records_batches_and_arrays():
    fn = fn_raises(at=3)
    assert fn(2) == 2
    assert fn([1, 2]) == [1, 2]
    for value in (3, [1, 3], (3,), {"x": 3}, [{"x": 3}], np.array([1, 3])):
        with pytest.raises(UserError, match="raised at 3"):
            fn(value)
    assert fn_raises(at={"x": 1})({"x": 2}) == {"x": 2}
    with pytest.raises(KeyError):
        fn_raises(at=1, exc=KeyError)(1)


def test_fn_raises_pickles_by_reference_and_is_named():
    fn = pickle.loads(pickle.dumps(fn_raises(at=5, fn=len)))
    assert fn([1, 2]) == 2
    assert fn.__name__ == "raises_at_5"
    assert type(pickle.loads(pickle.dumps(UserError("x")))) is UserError


def test_counting_source_counts_and_fails():
    source = CountingSource(range(5), fail_after=3)
    iterator = iter(source)
    assert [next(iterator) for _ in range(3)] == [0, 1, 2]
    assert source.pulled == 3
    with pytest.raises(UserError):
        next(iterator)
    assert list(CountingSource(range(3))) == [0, 1, 2]
    source = CountingSource([1])
    list(source)
    list(source)
    assert (source.iterations, source.pulled) == (2, 2)


def test_normalize_and_compare():
    assert normalize({"a": np.array([1.0], np.float32)}) == {"a": ("ndarray", "float32", [1.0])}
    assert normalize(np.array([1.0], np.float32)) != normalize(np.array([1.0], np.float64))
    assert normalize([float("nan")]) == normalize([float("nan")])
    assert_records_equal([2, 1], [1, 2], ordered=False)
    with pytest.raises(AssertionError):
        assert_records_equal([2, 1], [1, 2])
    with pytest.raises(AssertionError, match="records instead of"):
        assert_records_equal([1], [1, 2])


def test_assert_same_as_simple_runs_both():
    assert assert_same_as_simple(sp.from_iterable(range(3)), backend="simple") == [0, 1, 2]
    assert config_id({"backend": "multiprocessing", "num_cpu_workers": 2}) == "multiprocessing-num_cpu_workers=2"
    assert is_simple({}) and is_simple({"backend": "simple", "num_cpu_workers": 4})
    assert not is_simple({"num_cpu_workers": 2})


def test_backend_behaviour_probes_ask_capabilities_not_names():
    assert not reads_ahead({}) and reads_ahead({"backend": "threads"}) and reads_ahead({"num_cpu_workers": 2})
    assert runs_in_separate_processes({"backend": "multiprocessing"})
    assert not runs_in_separate_processes({"backend": "threads"}) and not runs_in_separate_processes({})
    assert {config["backend"] for config in in_process_configs()} == {"simple", "threads"}


def test_leak_probes_see_children_and_named_threads():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert process.pid in [child.pid for child in _live_children()]
    finally:
        process.kill()
        process.wait(timeout=10)
    assert process.pid not in [child.pid for child in _live_children()]

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(10,), name="streamproc-test-probe")
    thread.start()
    try:
        assert thread in _live_streamproc_threads()
    finally:
        stop.set()
        thread.join(timeout=10)
    assert thread not in _live_streamproc_threads()


def test_wait_for_condition():
    calls = []
    wait_for_condition(lambda: calls.append(1) or len(calls) >= 3, timeout_s=5)
    assert len(calls) == 3
    with pytest.raises(AssertionError, match="never"):
        wait_for_condition(lambda: False, timeout_s=0.05, message="never")
