"""Exceptions that do not pickle still come out of a worker as the user's type, message and traceback.

Fault injection found three ways an exception raised by user code lost itself on the way back:
one that holds something unpicklable became ``SerializationError: an output of task N cannot be
pickled``; one whose ``__init__`` takes other arguments than ``args`` failed to unpickle (a bare
``TypeError`` from a GPU worker, a ``SerializationError`` without stage or task from a CPU
worker); a ``MemoryError`` arrived with an empty message. ``ExceptionWithTraceback`` now always
pickles and rebuilds the user's type (or a ``RemoteError`` naming it).

The fakes below travel to workers (spawn imports this module): module level, no torch import at
the top.
"""

from __future__ import annotations

import pickle
import re
import sys
from typing import Any

import pytest

import streamproc as sp
from streamproc.errors import ExceptionWithTraceback, RemoteError
from streamproc.execution.serialization import dumps_message, loads_message
from tests.utils import collect_until_error, stage_notes

START_METHODS = ["fork", "spawn"]


# -- exceptions that do not survive a plain pickle round trip -----------------------------------


class UnpicklableStateError(Exception):
    """Holds a generator: pickling it raises ``TypeError: cannot pickle 'generator' object``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.pending = (i for i in range(3))
        self.code = 7


class TwoArgsError(Exception):
    """``type(exc)(*exc.args)`` fails: unpickling it raises ``TypeError: missing ... 'where'``."""

    def __init__(self, what: str, where: int) -> None:
        super().__init__(f"{what} failed at {where}")
        self.what = what
        self.where = where


class StrNeedsStateError(Exception):
    """Its ``str()`` needs the unpicklable attribute: it cannot be rebuilt as itself."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.pending = (i for i in range(3))

    def __str__(self) -> str:
        return f"{self.args[0]} (with a {type(self.pending).__name__})"


def raise_unpicklable_state(x: int) -> int:
    if x == 3:
        raise UnpicklableStateError(f"unpicklable state at {x}")
    return x


def raise_two_args(x: int) -> int:
    if x == 3:
        raise TwoArgsError("parse", x)
    return x


def raise_str_needs_state(x: int) -> int:
    if x == 3:
        raise StrNeedsStateError(f"str needs state at {x}")
    return x


def raise_memory_error(x: int) -> int:
    if x == 3:
        raise MemoryError
    return x


def to_tensor(records: list[int]) -> Any:
    import torch

    return torch.tensor(records)


def forward_raises_two_args(batch: Any) -> Any:
    if bool((batch == 3).any()):
        raise TwoArgsError("forward", 3)
    return batch + 1


def forward_raises_unpicklable_state(batch: Any) -> Any:
    if bool((batch == 3).any()):
        raise UnpicklableStateError("forward kept a generator")
    return batch + 1


def keep_records(records: list[int], outputs: Any) -> list[int]:
    return list(records)


#: (raising map fn, expected type, expected str(), line of the raise in the worker's traceback)
CPU_CASES = {
    "unpicklable-state": (
        raise_unpicklable_state,
        UnpicklableStateError,
        "unpicklable state at 3",
        'raise UnpicklableStateError(f"unpicklable state at {x}")',
    ),
    "init-takes-two-args": (raise_two_args, TwoArgsError, "parse failed at 3", 'raise TwoArgsError("parse", x)'),
    "str-needs-dropped-state": (
        raise_str_needs_state,
        RemoteError,
        "tests.test_error_carriers.StrNeedsStateError: str needs state at 3 (with a generator)",
        'raise StrNeedsStateError(f"str needs state at {x}")',
    ),
}


def mp_options(start_method: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "multiprocessing", "num_cpu_workers": 2, "process_start_method": start_method, **extra}


def worker_notes(exc: BaseException, kind: str) -> list[str]:
    return [note for note in exc.__notes__ if note.startswith(f"streamproc: raised in {kind} worker")]


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("case", CPU_CASES.values(), ids=CPU_CASES.keys())
def test_exception_that_does_not_pickle_comes_out_of_a_cpu_worker_as_itself(start_method, case):
    fn, exc_type, message, raise_line = case
    stream = sp.from_iterable(range(10)).map(fn).set_processing(task_size=5, **mp_options(start_method))
    outputs, exc = collect_until_error(stream)
    assert type(exc) is exc_type, repr(exc)
    assert str(exc) == message
    assert isinstance(exc.__cause__, sp.RemoteTraceback)
    assert raise_line in str(exc.__cause__)
    assert stage_notes(exc) == [f"streamproc: raised in stage 1 (map({fn.__name__}))"]
    assert len(worker_notes(exc, "cpu")) == 1
    assert re.fullmatch(r"streamproc: raised in cpu worker \d, task 0", worker_notes(exc, "cpu")[0])
    assert outputs == []  # deterministic: task 0 (records 0-4) failed, nothing after it comes out


@pytest.mark.parametrize("start_method", START_METHODS)
def test_attributes_that_pickle_are_kept(start_method):
    stream = sp.from_iterable(range(10)).map(raise_unpicklable_state).set_processing(**mp_options(start_method))
    _, exc = collect_until_error(stream)
    assert isinstance(exc, UnpicklableStateError)
    assert exc.code == 7
    assert not hasattr(exc, "pending")  # the generator stayed in the worker
    _, exc = collect_until_error(sp.from_iterable(range(10)).map(raise_two_args).set_processing(**mp_options(start_method)))
    assert isinstance(exc, TwoArgsError)
    assert (exc.what, exc.where) == ("parse", 3)


GPU_CASES = {
    "init-takes-two-args-fork": (forward_raises_two_args, TwoArgsError, "forward failed at 3", "fork"),
    "init-takes-two-args-spawn": (forward_raises_two_args, TwoArgsError, "forward failed at 3", "spawn"),
    "unpicklable-state-fork": (forward_raises_unpicklable_state, UnpicklableStateError, "forward kept a generator", "fork"),
}


@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_exception_that_does_not_pickle_comes_out_of_a_gpu_worker_as_itself(case):
    pytest.importorskip("torch")
    forward, exc_type, message, start_method = case
    options = mp_options(start_method, num_gpu_workers=1, gpu_worker_devices=["cpu"])
    stream = sp.from_iterable(range(10)).map_gpu(to_tensor, forward, keep_records, batch_size=2)
    _, exc = collect_until_error(stream.set_processing(task_size=5, **options))
    assert type(exc) is exc_type, repr(exc)
    assert str(exc) == message
    # The cause holds the GPU worker's traceback, with the line that raised.
    assert isinstance(exc.__cause__, sp.RemoteTraceback)
    assert f"raise {exc_type.__name__}(" in str(exc.__cause__)
    assert "Traceback in gpu worker 0 (cpu)" in str(exc.__cause__)
    stage = f"stage 1 (map_gpu(to_tensor, {forward.__name__}, keep_records, batch_size='2 records'))"
    assert stage_notes(exc) == [f"streamproc: raised in {stage}, forward"]
    assert worker_notes(exc, "gpu") == [f"streamproc: raised in gpu worker 0 (cpu), {stage}"]
    assert re.fullmatch(r"streamproc: raised in cpu worker \d, task 0", worker_notes(exc, "cpu")[0])


@pytest.mark.parametrize("start_method", START_METHODS)
def test_memory_error_without_a_message_names_the_stage_and_worker(start_method):
    stream = sp.from_iterable(range(10)).map(raise_memory_error).set_processing(task_size=5, **mp_options(start_method))
    _, exc = collect_until_error(stream)
    assert type(exc) is MemoryError
    assert re.fullmatch(
        r"out of memory \(a MemoryError without a message\) in stage 1 \(map\(raise_memory_error\)\), "
        r"in cpu worker \d, task 0",
        str(exc),
    ), str(exc)
    assert "raise MemoryError" in str(exc.__cause__)


# -- the carrier itself, without processes -------------------------------------------------------


def carried(exc: BaseException, where: str = "cpu worker 1, task 12") -> BaseException:
    """``exc`` raised, wrapped as a worker wraps it, sent through the transport and rebuilt."""
    try:
        raise exc
    except BaseException as raised:
        carrier = ExceptionWithTraceback(raised, where)
    error = loads_message(dumps_message(carrier))
    assert isinstance(error, BaseException)
    return error


def test_carrier_of_an_unpicklable_exception_always_pickles_with_the_standard_pickle():
    try:
        raise UnpicklableStateError("boom")
    except UnpicklableStateError as exc:
        with pytest.raises(TypeError, match="cannot pickle 'generator' object"):
            pickle.dumps(exc)
        carrier = ExceptionWithTraceback(exc, "cpu worker 1, task 12")
    error = pickle.loads(pickle.dumps(carrier))
    assert type(error) is UnpicklableStateError
    assert error.args == ("boom",)
    assert error.__notes__ == ["streamproc: raised in cpu worker 1, task 12"]


def test_exception_that_pickles_is_sent_as_itself():
    error = carried(ValueError("plain", 3))
    assert type(error) is ValueError
    assert error.args == ("plain", 3)
    assert "raise exc" in str(error.__cause__)
    assert error.__notes__ == ["streamproc: raised in cpu worker 1, task 12"]


def test_remote_error_keeps_notes_and_attributes_and_pickles_again():
    error = carried(StrNeedsStateError("no str"))
    assert type(error) is RemoteError
    assert isinstance(error, sp.StreamprocError)
    assert (error.type_name, error.message) == ("tests.test_error_carriers.StrNeedsStateError", "no str (with a generator)")
    assert error.__notes__ == ["streamproc: raised in cpu worker 1, task 12"]
    again = pickle.loads(pickle.dumps(error))  # e.g. re-raised from a pool of the user's own
    assert (type(again), str(again), again.__notes__) == (RemoteError, str(error), error.__notes__)


class ChangedError(Exception):
    """Stands for a class that unpickles in the worker but not in the receiving process."""


class ChangedErrorNeedsTwoArgs(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}{b}")


def test_exception_that_fails_to_unpickle_in_the_receiving_process_is_rebuilt(monkeypatch):
    try:
        raise ChangedError("ab")
    except ChangedError as exc:
        data = dumps_message(ExceptionWithTraceback(exc, "gpu worker 0 (cpu), stage 1"))
    # Where the message is loaded, the name now means a class whose __init__ needs two args.
    monkeypatch.setattr(sys.modules[__name__], "ChangedError", ChangedErrorNeedsTwoArgs)
    error = loads_message(data)
    assert type(error) is ChangedErrorNeedsTwoArgs
    assert (str(error), error.__notes__) == ("ab", ["streamproc: raised in gpu worker 0 (cpu), stage 1"])


def test_class_defined_in_a_function_becomes_a_remote_error_when_dill_cannot_help():
    class LocalError(Exception):
        def __init__(self, a: str, b: str) -> None:
            super().__init__(f"{a}/{b}")
            self.pending = (i for i in range(3))

    error = carried(LocalError("x", "y"))
    assert type(error) is RemoteError
    assert str(error) == f"{__name__}.{LocalError.__qualname__}: x/y"
    assert ".<locals>.LocalError" in str(error)


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


def test_exception_whose_str_raises_still_travels():
    error = carried(UnprintableError("x"))
    # It pickles, so it is sent as itself: str() still raises, as it did in the worker.
    assert type(error) is UnprintableError
    assert error.args == ("x",)


def test_memory_error_message_is_set_only_when_empty():
    assert str(carried(MemoryError("cannot allocate 8 GiB"))) == "cannot allocate 8 GiB"
    error = carried(MemoryError(), "gpu worker 0 (cuda:0), stage 2 (map_gpu(a, b))")
    assert str(error) == "out of memory (a MemoryError without a message) in gpu worker 0 (cuda:0), stage 2 (map_gpu(a, b))"
