"""Fakes that travel to worker processes in tests/test_multiprocessing_*.py (no test here).

Kept apart from the test modules and light to import on purpose: under spawn and forkserver
each worker imports the module that defines a callable it runs, and a test module pulls in
pytest, pyarrow and psutil (about half a second per worker on a small machine). Only the
standard library and streamproc's own core are imported here.

Workers talk back to a test through files: ``announce_started(path)`` writes the worker's pid
atomically, and ``wait_for_file(path)`` lets a worker wait (boundedly) for the test to release it.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

from streamproc.io.base import Source
from tests.utils import UserError, identity

#: How long a worker blocked on purpose waits for the test (to kill or release it) at most.
VICTIM_WAIT_S = 60.0
#: Poll interval of a worker waiting for a file (in the worker: never how a test synchronises).
FILE_POLL_S = 0.01

#: The source line of a raised fault, looked for in the remote traceback.
RAISE_LINE = 'raise UserError(f"injected fault at {where}")'


# -- signalling between a worker and the test ---------------------------------------------------


def announce_started(path: str) -> None:
    """Tells the test, through the file ``path``, that this process got there (writes its pid)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)  # atomic: the test never reads a half-written pid


def wait_for_file(path: str, timeout_s: float = VICTIM_WAIT_S) -> None:
    """Blocks this worker until the test creates ``path``; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the test never created {path}")
        time.sleep(FILE_POLL_S)


# -- checks run in the test process ------------------------------------------------------------


def live_worker_processes() -> list[Any]:
    """This process's descendants, minus multiprocessing's own servers (resource tracker, forkserver)."""
    from tests.hang_guard import worker_processes  # psutil and pytest: never in a worker

    return worker_processes()


def streamproc_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("streamproc-")]


# -- faults -------------------------------------------------------------------------------------


def do_fault(fault: str, where: str, started_path: Optional[str]) -> None:
    """Performs ``fault`` in the calling process: raise, sys_exit, os_exit, os_exit0, segfault or sigkill.

    For "sigkill" the process announces itself in ``started_path`` and waits for the test to
    kill it (the OOM killer's stand-in is external: see ``Killer`` in the fault tests).
    """
    if fault == "raise":
        raise UserError(f"injected fault at {where}")
    if fault == "sys_exit":
        sys.exit(3)
    if fault == "os_exit":
        os._exit(1)
    if fault == "os_exit0":  # a "normal" exit status, before the work is done
        os._exit(0)
    if fault == "segfault":
        faulthandler._sigsegv()
    if fault == "sigkill":
        assert started_path is not None
        announce_started(started_path)
        threading.Event().wait(VICTIM_WAIT_S)  # the test kills this process meanwhile
        raise AssertionError("the test never killed this worker")
    raise ValueError(f"unknown fault {fault!r}")


def _contains(value: Any, at: int) -> bool:
    if hasattr(value, "detach"):  # a tensor
        return bool((value == at).any())
    if isinstance(value, (list, tuple)):
        return any(_contains(v, at) for v in value)
    return bool(value == at)


class FaultAt:
    """Behaves as ``fn`` but performs ``fault`` when its first argument is (or holds) ``at``."""

    def __init__(self, fault: str, at: int, where: str, fn: Any = identity, started_path: Optional[str] = None) -> None:
        self.fault, self.at, self.where, self.fn, self.started_path = fault, at, where, fn, started_path
        self.__name__ = f"fault_in_{where}"

    def __call__(self, value: Any, *args: Any) -> Any:
        if _contains(value, self.at):
            do_fault(self.fault, self.where, self.started_path)
        return self.fn(value, *args)


class FaultySource(Source):
    """``range(n)`` read in the workers (payloads are ranges); performs ``fault`` at record ``at``."""

    def __init__(self, n: int, fault: str, at: int, started_path: Optional[str]) -> None:
        self.n, self.fault, self.at, self.started_path = n, fault, at, started_path

    def iter_tasks(self, task_size: int) -> Iterator[tuple[int, int]]:
        for start in range(0, self.n, task_size):
            yield start, min(start + task_size, self.n)

    def read_task(self, payload: tuple[int, int]) -> Iterator[int]:
        for i in range(*payload):
            if i == self.at:
                do_fault(self.fault, "the source", self.started_path)
            yield i

    def describe(self) -> str:
        return f"faulty_source({self.n})"


def _load_with_fault(fault: str, started_path: Optional[str]) -> Any:
    do_fault(fault, "stream unpickling", started_path)
    return identity


class FaultAtUnpickle:
    """A map fn that pickles fine and faults when unpickled (in the worker, loading the stream)."""

    __name__ = "fault_at_unpickle"

    def __init__(self, fault: str, started_path: Optional[str]) -> None:
        self.fault, self.started_path = fault, started_path

    def __call__(self, x: Any) -> Any:
        return x

    def __reduce__(self) -> tuple[Any, ...]:
        return _load_with_fault, (self.fault, self.started_path)


class FaultAtPickle:
    """An output that faults when pickled (in the worker, sending it back)."""

    def __init__(self, fault: str, started_path: Optional[str]) -> None:
        self.fault, self.started_path = fault, started_path

    def __reduce__(self) -> tuple[Any, ...]:
        do_fault(self.fault, "result pickling", self.started_path)
        return FaultAtPickle, (self.fault, self.started_path)


class ReturnFaultAtPickle:
    """A map fn whose output for record ``at`` faults when it is pickled."""

    __name__ = "returns_fault_at_pickle"

    def __init__(self, fault: str, at: int, started_path: Optional[str]) -> None:
        self.fault, self.at, self.started_path = fault, at, started_path

    def __call__(self, x: Any) -> Any:
        return FaultAtPickle(self.fault, self.started_path) if x == self.at else x


def _rebuild_in_worker_only(main_pid: int) -> Any:
    if os.getpid() == main_pid:
        raise UserError("injected fault at main unpickling")
    return FailsToUnpickleInMain(main_pid)


class FailsToUnpickleInMain:
    """An output that pickles fine in the worker and fails to unpickle in the main process."""

    def __init__(self, main_pid: int) -> None:
        self.main_pid = main_pid

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_in_worker_only, (self.main_pid,)


class ReturnFailsToUnpickleInMain:
    """A map fn whose output for record ``at`` cannot be unpickled in the main process."""

    __name__ = "returns_fails_to_unpickle_in_main"

    def __init__(self, main_pid: int, at: int) -> None:
        self.main_pid, self.at = main_pid, at

    def __call__(self, x: Any) -> Any:
        return FailsToUnpickleInMain(self.main_pid) if x == self.at else x


class UnpicklableError(Exception):
    """A user exception that cannot travel back to the main process: it holds a generator."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.state = (x for x in "ab")


class RaiseUnpicklableErrorAt:
    __name__ = "raise_unpicklable_error"

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, x: Any) -> Any:
        if x == self.at:
            raise UnpicklableError("cannot travel")
        return x


class GeneratorAt:
    """A map fn whose output for record ``at`` is a generator (neither pickle nor dill takes it)."""

    __name__ = "generator_at"

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, x: Any) -> Any:
        return (c for c in "ab") if x == self.at else x


class RaisesWhenPickled:
    """A record that cannot be pickled to be sent to a worker: its ``__reduce__`` raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise UserError("injected fault at feeder pickling")


# -- map_gpu pieces (a tiny CPU forward) ------------------------------------------------------


def to_tensor(records: list[int]) -> Any:
    import torch

    return torch.tensor(records)


def plus_one(batch: Any) -> Any:
    return batch + 1


def keep_records(records: list[int], outputs: Any) -> list[int]:
    return list(records)


def batch_identity(batch: list[Any]) -> list[Any]:
    return list(batch)


def always_true(x: Any) -> bool:
    return True


# -- faults in a GPU worker (forward, its start-up, pickling its outputs) ----------------------


def in_gpu_worker(gpu: int) -> bool:
    """Whether this process is GPU worker ``gpu`` (process ``streamproc-gpu-<gpu>``)."""
    import multiprocessing

    return multiprocessing.current_process().name == f"streamproc-gpu-{gpu}"


class FaultInGPUWorker:
    """``forward``: ``batch + 1``, except that GPU worker ``gpu`` performs ``fault`` on the
    ``at_batch``-th batch it computes (1-based).

    Counted per process (each GPU worker unpickles its own copy): which records reach which
    GPU worker depends on the dispatch schedule and on timing, a batch count does not.
    """

    __name__ = "fault_in_gpu_worker"

    def __init__(self, fault: str, gpu: int, at_batch: int, started_path: Optional[str] = None) -> None:
        self.fault, self.gpu, self.at_batch, self.started_path = fault, gpu, at_batch, started_path
        self.batches = 0

    def __call__(self, batch: Any) -> Any:
        if in_gpu_worker(self.gpu):
            self.batches += 1
            if self.batches == self.at_batch:
                return self.on_fault(batch)
        return batch + 1

    def on_fault(self, batch: Any) -> Any:
        do_fault(self.fault, f"forward in gpu worker {self.gpu}", self.started_path)
        return batch + 1


def _load_forward_with_fault(fault: str, gpu: int, started_path: Optional[str]) -> Any:
    if in_gpu_worker(gpu):
        do_fault(fault, f"start-up of gpu worker {gpu}", started_path)
    return plus_one


class FaultAtGPUStartup:
    """A model (``forward``) that faults when GPU worker ``gpu`` unpickles it, at its start-up.

    Only GPU workers unpickle ``forward``; any other process (the main process checking a
    pickle, another GPU worker) gets ``plus_one``.
    """

    __name__ = "fault_at_gpu_startup"

    def __init__(self, fault: str, gpu: int, started_path: Optional[str] = None) -> None:
        self.fault, self.gpu, self.started_path = fault, gpu, started_path

    def __call__(self, batch: Any) -> Any:
        return batch + 1

    def __reduce__(self) -> tuple[Any, ...]:
        return _load_forward_with_fault, (self.fault, self.gpu, self.started_path)


class OutputsFaultAtPickle(FaultInGPUWorker):
    """``forward`` whose outputs for the ``at_batch``-th batch of GPU worker ``gpu`` fault when
    they are pickled to go back to the CPU worker (in the GPU worker's sender thread)."""

    __name__ = "outputs_fault_at_pickle"

    def on_fault(self, batch: Any) -> Any:
        return FaultAtPickle(self.fault, self.started_path)


# -- shutdown-time behaviour ------------------------------------------------------------------


def die_on_sigterm(x: int) -> int:
    """Makes this worker die with exit code 7 when it is terminated (shutdown's SIGTERM)."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(7))
    return x


class IgnoreSigtermAndBlock:
    """Makes this worker ignore SIGTERM, then blocks on record ``at`` (shutdown must SIGKILL it)."""

    __name__ = "ignore_sigterm_and_block"

    def __init__(self, at: int, started_path: str) -> None:
        self.at, self.started_path = at, started_path

    def __call__(self, x: int) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if x == self.at:
            announce_started(self.started_path)
            threading.Event().wait(VICTIM_WAIT_S)
        return x


def _exit_abnormally() -> None:
    os._exit(5)


def register_abnormal_exit(x: int) -> int:
    """Makes this worker exit with code 5 at its very end (after Stop, as the main process shuts down)."""
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _exit_abnormally, exitpriority=100)
    return x


def block_forever(x: Any) -> Any:
    """A map fn that never returns: waits on an Event nobody sets, with no timeout.

    Only for tests of the hang guard, which must kill this worker (the leak check and the
    worker's parent watchdog would too).
    """
    threading.Event().wait()
    return x


class BlockAt:
    """Identity, except that record ``at`` announces itself and blocks until the test releases it."""

    __name__ = "block_at"

    def __init__(self, at: int, started_path: str, release_path: str) -> None:
        self.at, self.started_path, self.release_path = at, started_path, release_path

    def __call__(self, x: Any) -> Any:
        if x == self.at:
            announce_started(self.started_path)
            wait_for_file(self.release_path)
        return x


# -- big messages (> PIPE_MAX_SIZE, 64 KiB) ---------------------------------------------------

BIG = 256 * 1024


def big_record(i: int) -> bytes:
    return bytes([i % 256]) * BIG


def double_big(record: bytes) -> bytes:
    return record + record


class CrashOnBig:
    __name__ = "crash_on_big"

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, record: bytes) -> bytes:
        if record[0] == self.at:
            os._exit(1)
        return record + record


# -- a tiny model for map_gpu stages run inside CPU workers -------------------------------------


def features(records: list[dict[str, Any]]) -> Any:
    """``prepare_batch``: one row of 4 small ints per record, as a float32 tensor."""
    import torch

    return torch.tensor([[r["id"] % 5, r["id"] % 7, len(r["text"]), 1] for r in records], dtype=torch.float32)


class TinyModel:
    """``forward``: a ``Linear(4, 2)`` with small integer weights (so results are exact whatever
    the summation order or thread count), reachable as an attribute so the engine moves it."""

    __name__ = "tiny_model"

    def __init__(self) -> None:
        import torch

        self.linear = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.0], [0.0, 1.0, 1.0, -4.0]]))
            self.linear.bias.copy_(torch.tensor([0.5, -1.0]))

    def __call__(self, batch: Any) -> Any:
        return self.linear(batch)


def attach_outputs(records: list[dict[str, Any]], outputs: Any) -> list[dict[str, Any]]:
    """``postprocess``: each record with its output row and the size of its batch."""
    return [{**r, "y": row.tolist(), "batch_len": len(records)} for r, row in zip(records, outputs)]
