"""Shared fakes and helpers of the test suite (no test here).

Everything a stream may carry to a worker process (callables, exceptions) is defined at module
level, so that it pickles by reference under every start method, spawn included.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import streamproc as sp
from streamproc.backends.registry import get_backend
from streamproc.options import ProcessingOptions

#: ``set_processing`` keyword arguments of every backend configuration that the end-to-end tests
#: run under. Each one's output is compared with the simple backend's output on the same stream.
#: Append a configuration here when a backend lands, e.g.
#: ``{"backend": "multiprocessing", "num_cpu_workers": 2}``.
BACKEND_CONFIGS: list[dict[str, Any]] = [
    {"backend": "simple"},
    # fork (the Linux default) keeps the shared suite fast; tests/test_multiprocessing_*.py
    # cover spawn and forkserver, task sizes and deterministic=False (many shared tests
    # check order, and pass their own task_size). Three workers on a 2-core machine also
    # exercise oversubscription (tasks finishing out of order).
    {"backend": "multiprocessing", "num_cpu_workers": 1},
    {"backend": "multiprocessing", "num_cpu_workers": 3},
    # Threads: one thread runs tasks in order; three finish them out of order (and share
    # the source, the forward models and the sink's finalizer).
    {"backend": "threads", "num_cpu_workers": 1},
    {"backend": "threads", "num_cpu_workers": 3},
]

#: Ray (``tox -e ray`` sets STREAMPROC_TEST_RAY=1; the default env stays Ray-free): two CPU
#: worker actors on the session cluster of tests/ray_cluster.py; the conftest marks them ``ray``.
RAY_CONFIGS: list[dict[str, Any]] = [{"backend": "ray", "num_cpu_workers": 2}]
if os.environ.get("STREAMPROC_TEST_RAY") == "1":
    BACKEND_CONFIGS += RAY_CONFIGS

#: Upper bound, in tasks, of what a backend other than the simple one may pull from an
#: iterable source ahead of the consumer (feeder queues, the reorder window...). The simple
#: backend pulls exactly one task. Generous on purpose: it only has to catch a backend that
#: drains its source; tighten it to the backend's real bound when one exists.
MAX_PREFETCHED_TASKS = 64


def config_id(config: dict[str, Any]) -> str:
    """A readable pytest id for a backend configuration: ``multiprocessing-num_cpu_workers=2``."""
    rest = [f"{k}={v}" for k, v in config.items() if k != "backend"]
    return "-".join([str(config.get("backend", "default")), *rest])


def effective_backend(config: dict[str, Any]) -> str:
    return ProcessingOptions().updated(**config).effective_backend


def is_simple(config: dict[str, Any]) -> bool:
    return effective_backend(config) == "simple"


def reads_ahead(config: dict[str, Any]) -> bool:
    """Whether ``config`` runs tasks ahead of the consumer (workers running in parallel).

    The simple backend alone runs exactly the task the consumer is waiting for; every backend
    with workers may read up to ``MAX_PREFETCHED_TASKS`` tasks ahead.
    """
    return not is_simple(config)


def runs_in_separate_processes(config: dict[str, Any]) -> bool:
    """Whether ``config``'s backend runs user code in other processes (errors then carry the
    worker's traceback as a ``RemoteTraceback`` cause, and state shared with the caller is a copy)."""
    return get_backend(effective_backend(config)).capabilities.separate_processes


def in_process_configs() -> list[dict[str, Any]]:
    """The configurations of ``BACKEND_CONFIGS`` whose user code runs in this process, so it
    may use what lives only here (an fsspec memory filesystem, an open file, a lock)."""
    return [config for config in BACKEND_CONFIGS if not runs_in_separate_processes(config)]


def is_deterministic(config: dict[str, Any]) -> bool:
    """Whether ``config`` promises the simple backend's order (``deterministic=True``, the default)."""
    return ProcessingOptions().updated(**config).deterministic


# -- exceptions and callables ----------------------------------------------------------------


class UserError(Exception):
    """An exception of "user code": tests check it comes out of a sink with this very type."""


def identity(x: Any) -> Any:
    return x


def always_true(x: Any) -> bool:
    return True


def double(x: Any) -> Any:
    return x * 2


def is_odd(x: int) -> bool:
    return x % 2 == 1


def add(x: Any, k: Any = 0) -> Any:
    return x + k


def batch_as_record(batch: list[Any]) -> list[list[Any]]:
    """A ``map_batches`` fn whose output shows the batch composition: one record per batch."""
    return [list(batch)]


def _contains(value: Any, at: Any) -> bool:
    if hasattr(value, "any") and hasattr(value, "dtype"):  # a tensor or an array (not importing torch)
        return bool((value == at).any())
    if value == at:
        return True
    if isinstance(value, (list, tuple)):
        return any(_contains(v, at) for v in value)
    if isinstance(value, dict):
        return any(_contains(v, at) for v in value.values())
    return False


class _RaiseAt:
    """Calls ``fn``, but raises ``exc`` when the first argument is (or contains) ``at``."""

    def __init__(self, at: Any, exc: type[BaseException], fn: Callable[..., Any]) -> None:
        self.at = at
        self.exc = exc
        self.fn = fn
        self.__name__ = f"raises_at_{at}"  # what streamproc names the callable after

    def __call__(self, value: Any, *args: Any, **kwargs: Any) -> Any:
        if _contains(value, self.at):
            raise self.exc(f"raised at {self.at!r}")
        return self.fn(value, *args, **kwargs)


def fn_raises(at: Any, exc: type[BaseException] = UserError, fn: Callable[..., Any] = identity) -> Callable[..., Any]:
    """A picklable callable that behaves as ``fn`` but raises ``exc`` on the record ``at``.

    "On the record" means the first argument equals ``at`` or contains it (a batch, a list of
    records, a tensor), so the same fake serves map, filter, map_batches and map_gpu callables,
    in any process (no call counter that each worker would hold its own copy of).

    >>> fn_raises(at=2)(1)
    1
    """
    return _RaiseAt(at, exc, fn)


class CountingSource:
    """An iterable over ``items`` that records how many items it has yielded (``pulled``).

    With ``fail_after=k`` it raises ``exc`` after yielding ``k`` items. Each ``iter()`` starts
    over (``iterations`` counts them), so a stream over it can be run several times; ``pulled``
    adds up over all runs. It stays in the main process: every backend reads iterable
    sources there.
    """

    def __init__(self, items: Iterable[Any], fail_after: Optional[int] = None, exc: type[BaseException] = UserError) -> None:
        self.items = list(items)
        self.fail_after = fail_after
        self.exc = exc
        self.pulled = 0
        self.iterations = 0

    def __iter__(self) -> Iterator[Any]:
        self.iterations += 1
        return self._generate()

    def _generate(self) -> Iterator[Any]:
        for index, item in enumerate(self.items):
            if self.fail_after is not None and index >= self.fail_after:
                raise self.exc(f"source failed after {index} items")
            self.pulled += 1
            yield item
        if self.fail_after is not None and self.fail_after >= len(self.items):
            raise self.exc(f"source failed after {len(self.items)} items")


# -- comparing outputs ------------------------------------------------------------------------


def normalize(value: Any) -> Any:
    """``value`` with numpy arrays/scalars and tensors turned into plain Python, for ``==``.

    Arrays keep their dtype in the result, so a float32 row never equals a float64 one; NaN
    and NaT compare equal to themselves.
    """
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, tuple):
        return tuple(normalize(v) for v in value)
    if hasattr(value, "detach"):  # torch tensor
        return ("tensor", str(value.dtype), normalize(value.tolist()))
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy array or scalar
        return ("ndarray", str(value.dtype), normalize(value.tolist()))
    if _is_nan_like(value):  # NaN != NaN: make missing values compare equal to themselves
        return ("missing", type(value).__name__)
    return value


def _is_nan_like(value: Any) -> bool:
    try:
        return bool(value != value)
    except (TypeError, ValueError):
        return False


def assert_records_equal(actual: list[Any], expected: list[Any], ordered: bool = True) -> None:
    """Asserts two lists of records are equal (numpy-aware); ``ordered=False`` compares multisets."""
    actual_n, expected_n = normalize(list(actual)), normalize(list(expected))
    if not ordered:
        actual_n, expected_n = sorted(actual_n, key=repr), sorted(expected_n, key=repr)
    assert len(actual_n) == len(expected_n), f"{len(actual_n)} records instead of {len(expected_n)}"
    for index, (a, e) in enumerate(zip(actual_n, expected_n)):
        assert a == e, f"record {index} differs: {a!r} != {e!r}"


def assert_outputs(actual: list[Any], expected: list[Any], config: dict[str, Any]) -> None:
    """Asserts ``actual`` (run under ``config``) equals ``expected``: in order, unless ``config``
    has ``deterministic=False``, which promises the same records in any order."""
    assert_records_equal(actual, expected, ordered=is_deterministic(config))


def assert_same_as_simple(stream: sp.Stream, **config: Any) -> list[Any]:
    """Runs ``stream`` under ``config`` and under the simple backend; asserts equal outputs.

    The outputs must be identical, order included, unless ``config`` has
    ``deterministic=False`` (then the same multiset). The stream must be re-runnable (not over
    a one-shot generator).

    Returns:
        The output under ``config``; for ``deterministic=False``, the simple backend's output
        (the same records, checked here, in source order), so that callers can go on checking
        order-sensitive facts whatever the configuration.
    """
    expected = stream.set_processing(backend="simple").to_list()
    actual = stream.set_processing(**config).to_list()
    assert_outputs(actual, expected, config)
    return actual if is_deterministic(config) else expected


def collect_until_error(stream: Iterable[Any]) -> tuple[list[Any], Optional[BaseException]]:
    """Iterates ``stream``, returning the outputs seen and the exception that stopped it (or None)."""
    outputs: list[Any] = []
    try:
        for record in stream:
            outputs.append(record)
    except Exception as exc:
        return outputs, exc
    return outputs, None


def stage_notes(exc: BaseException) -> list[str]:
    """The notes streamproc attached to ``exc`` that name a stage ("raised in stage N (...)")."""
    return [note for note in getattr(exc, "__notes__", []) if note.startswith("streamproc: raised in stage")]


def wait_for_condition(
    predicate: Callable[[], bool], timeout_s: float = 5.0, interval_s: float = 0.02, message: str = ""
) -> None:
    """Polls ``predicate`` until it is true; fails after ``timeout_s`` (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {message or predicate}")
        time.sleep(interval_s)
