"""The CPU worker process: runs every op of the plan on the tasks it is sent.

Protocol: the worker reads ``Task`` messages from its task pipe until ``Stop``. For each task
it sends the task's outputs as ``TaskChunk`` messages on its result pipe, the last with
``last=True``, or a ``TaskFailed`` carrying the user's exception and traceback; it then takes
the next task. It exits on ``Stop``, when its parent dies, or when a pipe breaks.

Only what a child process needs is imported here.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from typing import Any, Optional

from ...errors import ExceptionWithTraceback, SerializationError, WorkerCrashedError
from ...execution.context import ExecutionContext
from ...execution.task import run_task
from .environment import cap_worker_threads, enable_faulthandler
from .gpu_client import GPUClient, RemoteForwardRunner
from .messages import SinkClosed, Stop, TaskChunk, TaskFailed, WorkerFailed, WorkerId
from ...execution.serialization import dill_loads, dumps_message, loads_message

#: How often the parent-death watchdog looks at ``os.getppid()``.
PARENT_CHECK_INTERVAL_S = 1.0


def watch_parent(parent_pid: int) -> None:
    """Exits this process when the parent is gone (torch DataLoader's ManagerWatchdog).

    A thread, so that it also fires while the main loop is blocked sending a large result.
    """
    # Under forkserver the parent is the fork server, not ``parent_pid``, and it outlives a killed
    # main process (every worker holds its "alive" pipe open): there, only multiprocessing's
    # parent sentinel (a pipe the main process holds open) tells. Under fork, a sibling worker
    # inherits that pipe too, so os.getppid() is what tells.
    parents = {parent_pid, os.getppid()}
    sentinel_parent = multiprocessing.parent_process()
    stop = threading.Event()
    while not stop.wait(PARENT_CHECK_INTERVAL_S):
        if os.getppid() not in parents or (sentinel_parent is not None and not sentinel_parent.is_alive()):
            os._exit(1)


class _ResultSender:
    """Pickles and sends result messages; a result that cannot be pickled becomes an error."""

    def __init__(self, conn: Any, worker: WorkerId) -> None:
        self.conn = conn
        self.worker = worker

    def send(self, message: Any) -> None:
        try:
            data = dumps_message(message)
        except Exception as exc:
            task = getattr(message, "task_index", None)
            error = SerializationError(f"an output of task {task} cannot be pickled to send it back from {self.worker}: {exc}")
            carrier = ExceptionWithTraceback(error, f"{self.worker}, task {task}")
            data = dumps_message(TaskFailed(task, carrier) if task is not None else WorkerFailed(self.worker, carrier))
        self.conn.send_bytes(data)


def run_cpu_worker(
    index: int,
    plan_bytes: bytes,
    task_conn: Any,
    result_conn: Any,
    parent_pid: int,
    gpu_channels: Optional[dict[int, tuple[Any, Any]]] = None,
    gpu_cycle: Optional[list[int]] = None,
) -> None:
    """Entry point of process ``streamproc-cpu-<index>``. See the module docstring.

    With GPU workers, ``gpu_channels`` maps each GPU worker of this worker's dispatch cycle
    ``gpu_cycle`` to its ``(batch pipe writer, output pipe reader)``; ``map_gpu`` stages then
    send their prepared batches there instead of running forward here.
    """
    enable_faulthandler()
    # Ctrl-C reaches the whole process group: the main process handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cap_worker_threads()
    threading.Thread(target=watch_parent, args=(parent_pid,), name=f"streamproc-cpu-{index}-watchdog", daemon=True).start()
    worker = WorkerId("cpu", index)
    sender = _ResultSender(result_conn, worker)
    try:
        plan, finalize, writers = dill_loads(plan_bytes)
    except BaseException as exc:
        if not isinstance(exc, Exception):
            # sys.exit() in a user __setstate__: re-raised as is, it would exit the main process.
            crash = WorkerCrashedError(f"{worker} stopped while loading the stream: user code raised {exc!r}")
            crash.__cause__, exc = exc, crash
        sender.send(WorkerFailed(worker, ExceptionWithTraceback(exc, f"{worker}, while loading the stream")))
        sys.exit(1)
    client = GPUClient(worker, gpu_channels, gpu_cycle or []) if gpu_channels else None
    # Without GPU workers (num_gpu_workers=0), forward runs here, on the CPU: CPU workers
    # never initialise CUDA (see design.md section 3).
    ctx = ExecutionContext(
        str(worker),
        device="cpu",
        autocast=plan.options.autocast,
        torch_threads=plan.options.forward_threads,
        make_forward_runner=_remote_runners(client),
    )
    # A worker-side sink (write_parquet with deterministic=False) writes here; its writer's
    # ``write`` is then the chunk finalizer, and only counts go back.
    sink = writers.open_in_worker(index) if writers is not None else None
    sink_closed = False
    try:
        while True:
            message = loads_message(task_conn.recv_bytes())
            if isinstance(message, Stop):
                break
            _run_task(plan, message, ctx, sink.write if sink is not None else finalize, sender, worker)
        if sink is not None:
            try:
                paths, rows = sink.close()
                sink_closed = True
            except Exception as exc:
                sender.send(WorkerFailed(worker, ExceptionWithTraceback(exc, f"{worker}, completing its part files")))
            else:
                sender.send(SinkClosed(worker, paths, rows))
    except (EOFError, BrokenPipeError):
        pass  # the main process closed our pipes: it is shutting down
    finally:
        if sink is not None and not sink_closed:
            sink.abort()
        if client is not None:
            client.close()
        result_conn.close()


def _remote_runners(client: Optional[GPUClient]) -> Any:
    """The forward-runner factory sending ``map_gpu`` stages to GPU workers (None: run here)."""
    if client is None:
        return None
    return lambda stage: RemoteForwardRunner(client, stage.index)


def _run_task(plan: Any, task: Any, ctx: ExecutionContext, finalize: Any, sender: _ResultSender, worker: WorkerId) -> None:
    try:
        for output in run_task(plan, task, ctx, finalize):
            sender.send(TaskChunk(task.index, output.chunk, output.count, output.last))
    except BaseException as exc:
        where = f"{worker}, task {task.index}"
        if isinstance(exc, Exception):
            sender.send(TaskFailed(task.index, ExceptionWithTraceback(exc, where)))
            return
        # sys.exit() or similar in user code: the worker ends, and the run fails with a
        # streamproc error rather than exiting the user's main process.
        args = ", ".join(map(repr, exc.args))
        crash = WorkerCrashedError(f"{worker} stopped: user code raised {type(exc).__name__}({args}) in task {task.index}")
        crash.__cause__ = exc
        sender.send(TaskFailed(task.index, ExceptionWithTraceback(crash, where)))
        raise
