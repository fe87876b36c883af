"""Shared state that cannot cross processes is refused before workers start; models that travel warn.

The walk (``streamproc.execution.captures.find_captures``) is tested as a pure function: each
resource kind, nested every way dill would carry it, and the common objects that must not be
refused. End to end: the multiprocessing backend refuses such a stream before starting any
process, the simple backend runs it, and a ``prepare_batch`` that closes over the GPU workers'
model warns with ``ModelShippedWarning``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import multiprocessing
import os
import queue
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import streamproc as sp
from streamproc.execution.captures import (
    CAPTURE_SEARCH_DEPTH,
    MAX_OBJECTS_VISITED,
    ModelShippedWarning,
    check_plan_captures,
    find_captures,
    resource_kind,
)
from streamproc.execution.serialization import dumps_plan, dumps_worker_plan
from streamproc.execution.split import split_plan
from streamproc.plan import build_plan
from tests.utils import add

#: A global that the functions below name (set per test with monkeypatch).
SHARED: Any = None


# -- resources, one per kind ------------------------------------------------------------------


class FakeDBAPIConnection:
    """The shape of a DB-API 2 connection (psycopg, pymysql...), recognized without importing them."""

    def cursor(self) -> Any: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


FakeDBAPIConnection.__module__ = "psycopg.connection"
FakeDBAPIConnection.__name__ = FakeDBAPIConnection.__qualname__ = "Connection"


class FakeDBAPICursor:
    def execute(self, query: str) -> None: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> Any: ...
    def close(self) -> None: ...


FakeDBAPICursor.__module__ = "pymysql.cursors"
FakeDBAPICursor.__name__ = FakeDBAPICursor.__qualname__ = "Cursor"


@pytest.fixture
def make_resource(tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """Builds a resource by name; closes, joins or reaps every one at teardown (hence no ``with``)."""
    cleanups: list[Callable[[], Any]] = []
    ctx = multiprocessing.get_context("fork")

    def make(name: str) -> Any:
        factories: dict[str, Callable[[], Any]] = {
            "file_w": lambda: open(tmp_path / "out.txt", "w"),  # noqa: SIM115
            "file_rb": lambda: open(__file__, "rb"),  # noqa: SIM115
            "raw_fd_file": lambda: os.fdopen(os.open(tmp_path / "raw", os.O_CREAT | os.O_WRONLY), "wb", buffering=0),
            "lock": threading.Lock,
            "rlock": threading.RLock,
            "condition": threading.Condition,
            "semaphore": threading.Semaphore,
            "bounded_semaphore": threading.BoundedSemaphore,
            "event": threading.Event,
            "barrier": lambda: threading.Barrier(2),
            "thread": lambda: threading.Thread(target=print),
            "queue": queue.Queue,
            "mp_lock": ctx.Lock,
            "mp_rlock": ctx.RLock,
            "mp_semaphore": ctx.Semaphore,
            "mp_event": ctx.Event,
            "mp_condition": ctx.Condition,
            "mp_queue": ctx.Queue,
            "mp_pipe_end": lambda: ctx.Pipe()[0],
            "socket": socket.socket,
            "sqlite_connection": lambda: sqlite3.connect(":memory:"),
            "sqlite_cursor": lambda: sqlite3.connect(":memory:").cursor(),
            "dbapi_connection": FakeDBAPIConnection,
            "dbapi_cursor": FakeDBAPICursor,
            "popen": lambda: subprocess.Popen([sys.executable, "-c", "pass"]),
        }
        value = factories[name]()
        methods = ["wait"] if isinstance(value, subprocess.Popen) else [m for m in ("close", "join_thread") if hasattr(value, m)]
        if isinstance(value, sqlite3.Cursor):
            cleanups.append(value.connection.close)
        cleanups.append(lambda: [getattr(value, m)() for m in methods])  # close a queue before join_thread
        return value

    yield make
    for cleanup in reversed(cleanups):
        cleanup()


RESOURCES = {
    "file_w": "an open file",
    "file_rb": "an open file",
    "raw_fd_file": "an open file",
    "lock": "a lock",
    "rlock": "a lock",
    "condition": "a condition variable",
    "semaphore": "a semaphore",
    "bounded_semaphore": "a semaphore",
    "event": "an event",
    "barrier": "a barrier",
    "thread": "a thread",
    "queue": "a Queue (queue.Queue)",
    "mp_lock": "a multiprocessing lock or semaphore",
    "mp_rlock": "a multiprocessing lock or semaphore",
    "mp_semaphore": "a multiprocessing lock or semaphore",
    "mp_event": "a multiprocessing event",
    "mp_condition": "a multiprocessing condition variable",
    "mp_queue": "a Queue (multiprocessing.queues.Queue)",
    "mp_pipe_end": "a pipe connection",
    "socket": "a socket",
    "sqlite_connection": "a database connection (sqlite3.Connection)",
    "sqlite_cursor": "a database cursor (sqlite3.Cursor)",
    "dbapi_connection": "a database connection (psycopg.connection.Connection)",
    "dbapi_cursor": "a database cursor (pymysql.cursors.Cursor)",
    "popen": "a subprocess",
}


@pytest.mark.parametrize("name", sorted(RESOURCES))
def test_each_resource_kind_is_recognized(make_resource, name):
    resource = make_resource(name)
    kind = resource_kind(resource)
    assert kind is not None and kind[0] == RESOURCES[name]

    def uses_it(x: int) -> Any:
        return resource, x

    found = find_captures(uses_it).resources
    assert [(c.kind, c.path, c.where()) for c in found] == [(RESOURCES[name], ("resource",), "variable 'resource'")]


# -- nested every way dill carries it -----------------------------------------------------------


class Holder:
    def __init__(self, value: Any) -> None:
        self.value = value


class CallableHolder(Holder):
    def __call__(self, x: Any) -> Any:
        return x

    def method(self, x: Any) -> Any:
        return x


class DropsItsFile:
    """The recommended per-worker pattern: the file is opened on first call and never pickled."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: Any = None

    def __call__(self, x: Any) -> Any:
        if self.file is None:
            self.file = open(self.path, "a")  # noqa: SIM115 (kept open across calls, by design)
        self.file.write(f"{x}\n")
        return x

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "file": None}


def _nestings(res: Any) -> dict[str, tuple[Any, str]]:
    """Callables that reach ``res`` in different ways, with the ``where()`` each capture must report."""
    holder = Holder(res)
    files = {"out": [res]}

    def closure(x: Any) -> Any:
        return res

    def through_attribute(x: Any) -> Any:
        return holder

    def through_containers(x: Any) -> Any:
        return files

    def through_global(x: Any) -> Any:
        return SHARED

    def helper(x: Any) -> Any:
        return SHARED

    def through_helper(x: Any) -> Any:
        return helper(x)

    def in_a_comprehension(xs: Any) -> Any:
        return [SHARED for _ in xs]

    def through_default(x: Any, out: Any = res) -> Any:
        return out

    def plain(x: Any, out: Any = None) -> Any:
        return out

    return {
        "closure": (closure, "variable 'res'"),
        "lambda": (lambda x: res.write(x), "variable 'res'"),
        "attribute": (through_attribute, "variable 'holder', as holder.value"),
        "containers": (through_containers, "variable 'files', as files['out'][0]"),
        "global": (through_global, "variable 'SHARED'"),
        "global of a helper": (through_helper, "variable 'helper', as helper -> SHARED"),
        "comprehension": (in_a_comprehension, "variable 'SHARED'"),
        "default": (through_default, "variable 'out'"),
        "partial keyword": (functools.partial(plain, out=res), "variable 'out'"),
        "partial arg": (functools.partial(plain, 1, res), "as args[1]"),
        "callable object": (CallableHolder(res), "as self.value"),
        "bound method": (CallableHolder(res).method, "as method.__self__.value"),
        "builtin bound method": (res.__enter__, "as __enter__.__self__"),
    }


NESTINGS = [
    "closure", "lambda", "attribute", "containers", "global", "global of a helper", "comprehension", "default",
    "partial keyword", "partial arg", "callable object", "bound method", "builtin bound method",
]


@pytest.mark.parametrize("how", NESTINGS)
@pytest.mark.parametrize("name", ["file_w", "lock", "sqlite_connection"])
def test_resources_are_found_where_dill_would_carry_them(make_resource, monkeypatch, name, how):
    resource = make_resource(name)
    monkeypatch.setattr(sys.modules[__name__], "SHARED", resource)
    nestings = _nestings(resource)
    assert list(nestings) == NESTINGS
    fn, where = nestings[how]
    found = find_captures(fn, root=getattr(fn, "__name__", "self"))
    assert [c.value for c in found.resources] == [resource]
    assert found.resources[0].where() == where


def test_map_kwargs_and_the_callable_itself_are_checked(make_resource):
    out = make_resource("file_w")
    plan = build_plan(sp.from_iterable(range(3)).map(add, kwargs={"k": out}))
    expected = r"the map kwargs of stage 1 \(map\(add\)\) captures an open file .*\(as kwargs\['k'\]\)"
    with pytest.raises(sp.SerializationError, match=expected):
        check_plan_captures(plan, plan)
    plan = build_plan(sp.from_iterable(range(3)).map(out.write))
    with pytest.raises(sp.SerializationError, match=r"the map fn 'TextIOWrapper.write' of stage 1 .*\(as write.__self__\)"):
        check_plan_captures(plan, plan)


def test_the_walk_stops_at_its_depth(make_resource):
    resource = make_resource("lock")
    nested: Any = resource
    for _ in range(CAPTURE_SEARCH_DEPTH):
        nested = [nested]

    def deep(x: Any) -> Any:
        return nested

    assert find_captures(deep).resources == []  # the closure cell is one step, each list one more
    assert [c.value for c in find_captures(deep, depth=CAPTURE_SEARCH_DEPTH + 1).resources] == [resource]


# -- no false positives ------------------------------------------------------------------------


def test_common_objects_are_not_refused(tmp_path):
    torch = pytest.importorskip("torch")
    with open(tmp_path / "closed.txt", "w") as closed:
        pass
    handler = logging.FileHandler(tmp_path / "log.txt")
    logger = logging.getLogger("streamproc-test-captures")
    logger.addHandler(handler)

    @dataclasses.dataclass
    class Config:
        scale: int = 2

    lazy = DropsItsFile(str(tmp_path / "lazy.txt"))
    lazy(1)  # its file is open now, and still not pickled
    objects = {
        "array": np.arange(10),
        "tensor": torch.ones(3),
        "closed file": closed,
        "stdout": sys.stdout,
        "stderr": sys.stderr,
        "stdin": sys.stdin,
        "real stdout": sys.__stdout__,
        "bytes buffer": io.BytesIO(b"abc"),
        "text buffer": io.StringIO("abc"),
        "modules": (os, threading, logging, multiprocessing, socket),
        "classes": (threading.Thread, sqlite3.Connection, Holder),
        "library functions": (logging.info, os.path.join, threading.current_thread, print, len),
        "logger with a file handler": logger,
        "dataclass": Config(),
        "per-worker class that drops its file": lazy,
        "containers": {"a": [1, 2.5, "x", None], "b": (b"y", range(3)), "c": {1, 2}},
    }
    try:
        for name, value in objects.items():

            def uses(x: Any, value: Any = value) -> Any:
                return value

            assert find_captures(uses).resources == [], name
    finally:
        logger.removeHandler(handler)
        handler.close()
        lazy.file.close()


def test_a_torch_module_is_a_model_not_a_resource():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(2, 2)
    model.lock_like = threading.Lock()  # inside a module: not entered (a module is fine)

    def uses(x: Any) -> Any:
        return model(x)

    found = find_captures(uses)
    assert found.resources == [] and [c.value for c in found.models] == [model]


def test_module_level_functions_travel_by_reference_and_are_not_entered(make_resource, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SHARED", make_resource("lock"))
    # Importable by name: dill pickles a reference; the worker uses its own module's SHARED.
    assert find_captures(module_level_function_naming_shared).resources == []


def module_level_function_naming_shared(x: Any) -> Any:
    return SHARED, x


def test_the_walk_is_bounded_on_a_big_capture(monkeypatch):
    big = [{"id": i, "text": "w" * 10} for i in range(200_000)]
    calls: list[Any] = []
    counting = lambda value: calls.append(value) or resource_kind(value)  # noqa: E731
    monkeypatch.setattr("streamproc.execution.captures.resource_kind", counting)

    def uses(x: Any) -> Any:
        return big

    assert find_captures(uses).resources == []
    assert 0 < len(calls) <= MAX_OBJECTS_VISITED


# -- end to end: refused before any worker starts, fine on the simple backend -------------------


def _record_process_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    started: list[str] = []
    original_start = multiprocessing.process.BaseProcess.start

    def recording_start(self: Any) -> None:
        started.append(self.name)
        original_start(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", recording_start)
    return started


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_lambda_writing_to_an_open_file_is_refused_before_any_worker_starts(monkeypatch, tmp_path, method):
    started = _record_process_starts(monkeypatch)
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    with open(tmp_path / "out.txt", "w") as out:
        stream = sp.from_iterable(range(10)).map(lambda x: out.write(f"{x}\n"))
        stream = stream.set_processing(backend="multiprocessing", num_cpu_workers=2, process_start_method=method)
        with pytest.raises(sp.SerializationError) as info:
            stream.to_list()
    message = str(info.value)
    lambda_name = r"[\w.]*<locals>\.<lambda>"
    name = re.escape(repr(str(tmp_path / "out.txt")))
    assert re.search(rf"the map fn '{lambda_name}' of stage 1 \(map\({lambda_name}\)\) captures an open file "
                     rf"<_io.TextIOWrapper name={name} mode='w'> \(variable 'out'\)", message), message
    assert "open it inside the function, or in a per-worker class" in message and "write_jsonl/write_parquet" in message
    assert started == []
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children_before


def test_a_lambda_writing_to_an_open_file_works_on_the_simple_backend(tmp_path):
    with open(tmp_path / "out.txt", "w") as out:
        lengths = sp.from_iterable(range(10)).map(lambda x: out.write(f"{x}\n")).set_processing(backend="simple").to_list()
    assert lengths == [2] * 10
    assert (tmp_path / "out.txt").read_text().split() == [str(i) for i in range(10)]


def test_a_lock_shared_by_a_map_fn_is_refused(monkeypatch):
    started = _record_process_starts(monkeypatch)
    lock = threading.Lock()
    counts: list[int] = []

    def count(x: int) -> int:
        with lock:
            counts.append(x)
        return x

    stream = sp.from_iterable(range(10)).map(count).set_processing(backend="multiprocessing", num_cpu_workers=2)
    with pytest.raises(sp.SerializationError, match=r"the map fn '.*count' of stage 1 .* captures a lock .*\(variable 'lock'\)"):
        stream.to_list()
    assert started == []
    assert sp.from_iterable(range(10)).map(count).set_processing(backend="simple").to_list() == list(range(10))
    assert counts == list(range(10))  # simple: the lock works


def _role_streams(res: Any) -> dict[str, sp.Stream]:
    def uses(x: Any) -> Any:
        return res, x

    source = sp.from_iterable(range(4))
    return {
        "filter predicate": source.filter(uses),
        "map_batches fn": source.map_batches(uses),
        "map_gpu prepare_batch": source.map_gpu(uses, len),
        "map_gpu forward": source.map_gpu(len, uses),
        "map_gpu postprocess": source.map_gpu(len, len, uses),
    }


@pytest.mark.parametrize("role", list(_role_streams(None)))
def test_every_callable_of_every_op_is_checked(make_resource, role):
    plan = build_plan(_role_streams(make_resource("socket"))[role])
    cpu_plan, _ = split_plan(plan)
    with pytest.raises(sp.SerializationError, match=rf"the {role} '.*uses' of stage 1 .* captures a socket .*\(variable 'res'\)"):
        check_plan_captures(plan, cpu_plan)


def test_dumps_worker_plan_checks_the_whole_plan_and_dumps_plan_does_not_check_again(make_resource):
    plan = build_plan(_role_streams(make_resource("lock"))["map_gpu forward"])
    cpu_plan, forwards = split_plan(plan)
    with pytest.raises(sp.SerializationError, match="captures a lock"):
        dumps_worker_plan(plan, cpu_plan, None, None)
    dumps_plan((forwards, None, 1), plan)  # checked with the CPU plan, once per run (dill copies the lock)


# -- models that travel to CPU workers ---------------------------------------------------------


def _model_stream(torch: Any, in_features: int, prepare_uses_model: bool) -> sp.Stream:
    model = torch.nn.Linear(in_features, 1024)  # 1024 * (in_features + 1) float32 parameters

    def prepare(records: list[int]) -> Any:
        return torch.ones(len(records), model.in_features) * torch.tensor(records, dtype=torch.float32)[:, None]

    def prepare_without_model(records: list[int]) -> Any:
        return torch.ones(len(records), in_features) * torch.tensor(records, dtype=torch.float32)[:, None]

    def forward(batch: Any) -> Any:
        with torch.no_grad():
            return model(batch).sum(dim=1)

    return sp.from_iterable(range(8)).map_gpu(prepare if prepare_uses_model else prepare_without_model, forward, batch_size=4)


def test_prepare_batch_closing_over_the_gpu_model_warns():
    torch = pytest.importorskip("torch")
    stream = _model_stream(torch, 512, prepare_uses_model=True)  # 2.1 MB of float32
    expected = stream.set_processing(backend="simple").to_list()
    options = {"backend": "multiprocessing", "num_cpu_workers": 1, "num_gpu_workers": 1, "gpu_worker_devices": ["cpu"]}
    with pytest.warns(ModelShippedWarning) as record:
        got = stream.set_processing(**options).to_list()
    assert np.allclose(got, expected)
    shipped = [w for w in record if issubclass(w.category, ModelShippedWarning)]
    assert len(shipped) == 1
    message = str(shipped[0].message)
    assert "the map_gpu prepare_batch '" in message and "prepare' of stage 1 (map_gpu(" in message
    assert "captures the model Linear (2.1 MB of parameters and buffers, variable 'model') that the GPU workers run" in message
    assert "tokenizer = model.tokenizer" in message and "per-worker class" in message
    assert shipped[0].filename == __file__  # points at the user's call, not at streamproc


@pytest.mark.parametrize(
    "case", ["prepare does not use the model", "model under 1 MB", "no GPU workers: forward runs in CPU workers"]
)
def test_no_model_warning_when_nothing_big_travels_for_nothing(case):
    torch = pytest.importorskip("torch")
    in_features = 16 if case == "model under 1 MB" else 512
    stream = _model_stream(torch, in_features, prepare_uses_model=case != "prepare does not use the model")
    plan = build_plan(stream)
    cpu_plan = plan if case.startswith("no GPU workers") else split_plan(plan)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelShippedWarning)
        check_plan_captures(plan, cpu_plan)


def test_streams_without_torch_never_import_it(tmp_path):
    script = (
        "import sys, streamproc as sp\n"
        "from streamproc.plan import build_plan\n"
        "from streamproc.execution.serialization import dumps_worker_plan\n"
        "plan = build_plan(sp.from_iterable(range(3)).map(lambda x: x + 1).map_batches(list))\n"
        "dumps_worker_plan(plan, plan, None, None)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(sp.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
