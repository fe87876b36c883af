"""The multiprocessing backend: N CPU worker processes fed by N feeder threads.

Data flow (all pipes are one-way ``multiprocessing.Pipe``s, one pair per worker)::

    main process                                          CPU worker i (process streamproc-cpu-i)
    ------------                                          -------------------------------------
    source.iter_tasks() --> TaskDispatcher
      (one lock; bounds: in-flight per worker,
       reorder window)
          |  next_task()
          v
    feeder thread i --Task(index, payload)...Stop--> task pipe i --> read_task -> ops -> finalize
                                                                           |
    collector (the sink's thread)  <--TaskChunk/TaskFailed-- result pipe i <--+
      wait(result pipes + process sentinels + wakeup pipe)
      -> ReorderBuffer (deterministic: task order) -> (chunk, count) to the sink

NOTE [ streamproc shutdown ]
    Every exit path goes through :meth:`_Run.shutdown`, which is idempotent (a lock and a
    flag). It stops the dispatcher (feeders hand out no more tasks), then:
    * after a complete run, every feeder has sent ``Stop``: the workers exit by themselves
      and are joined with a timeout;
    * on any other path (user error, worker crash, consumer breaking out of the loop,
      ``close()``/garbage collection of the iterator, KeyboardInterrupt) the remaining work is
      not needed: workers are terminated first, so that no feeder stays blocked sending to a
      worker that is itself blocked sending results nobody reads.
    Workers still alive after ``SHUTDOWN_JOIN_TIMEOUT_S`` are killed (SIGKILL). Feeder threads
    are then joined (their pipes are broken or drained) and all connections closed. Nothing
    here waits without a timeout.
"""

from __future__ import annotations

import collections
import gc
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from ...errors import PipelineShutdownError, SerializationError, WorkerCrashedError, add_context_note
from ...execution.dispatch import TaskDispatcher
from ...execution.split import split_plan
from ...execution.task import TaskOutput
from ...plan import Plan
from .cpu_worker import run_cpu_worker
from .environment import default_num_cpu_workers, format_exit_code, resolve_start_method
from .feeder import feed_worker
from .gpu_worker import run_gpu_worker
from .messages import SinkClosed, TaskChunk, TaskFailed, WorkerFailed, WorkerId
from ...execution.reorder import ReorderBuffer
from ...execution.serialization import dumps_plan, loads_message
from .topology import build_topology, resolve_gpu_devices

if TYPE_CHECKING:
    from ...io.sinks import Sink

#: Tasks sent to one worker and not finished: one running, one waiting in its pipe.
MAX_TASKS_IN_FLIGHT_PER_WORKER = 2
#: Deterministic runs: how many tasks past the oldest unfinished one may be handed out, per worker.
REORDER_WINDOW_TASKS_PER_WORKER = 4
#: Upper bound of one wait for results; sentinels wake us at once when a worker dies.
RESULT_WAIT_TIMEOUT_S = 1.0
SHUTDOWN_JOIN_TIMEOUT_S = 5.0
KILL_JOIN_TIMEOUT_S = 2.0


def _prepare_parent_for_fork() -> None:
    """Makes forked workers cheaper: shared imports done once, the parent's objects left alone.

    pyarrow imports pandas on its first conversion; done here, the forked workers inherit it
    instead of each importing it (about 0.3 s of CPU per worker). ``gc.freeze()`` keeps the
    workers' collections from traversing, and so copying on write, every object inherited from
    the parent; the parent unfreezes once the workers have started.
    """
    if "pyarrow" in sys.modules and "pandas" not in sys.modules:
        try:
            import pandas  # noqa: F401
        except ImportError:
            pass
    gc.freeze()


class _Worker:
    """Main-process handle of one CPU worker: process, pipes, feeder thread, dispatched tasks."""

    def __init__(self, worker_id: WorkerId, process: Any, task_conn: Any, result_conn: Any) -> None:
        self.id = worker_id
        self.process = process
        self.task_conn = task_conn
        self.result_conn = result_conn
        self.feeder: Optional[threading.Thread] = None
        #: Task indices sent and not finished, oldest first (appended by the feeder thread).
        self.dispatched: collections.deque[int] = collections.deque()
        self.last_error: Optional[BaseException] = None
        #: Rows the worker wrote, once it reported its part files complete (worker-side sinks).
        self.sink_rows: Optional[int] = None
        self.finished = False


class _Run:
    """One execution of a plan. Owns the processes and threads; see NOTE [ streamproc shutdown ]."""

    def __init__(self, plan: Plan, sink: Sink) -> None:
        self.plan = plan
        self.finalize = sink.finalizer()
        self.writers = sink.worker_writers() if sink.in_workers else None
        options = plan.options
        gpu_devices = resolve_gpu_devices(plan)
        self.num_workers = options.num_cpu_workers or default_num_cpu_workers(len(gpu_devices))
        self.topology = build_topology(self.num_workers, gpu_devices)
        # CPU workers never touch CUDA, so they may fork (unless CUDA is initialised here);
        # GPU workers on CUDA devices are spawned (or forkserver'd), never forked.
        self.start_method = resolve_start_method(options.process_start_method, needs_gpu_workers=False)
        uses_cuda = any(device.startswith("cuda") for device in gpu_devices)
        self.gpu_start_method = resolve_start_method(options.process_start_method, needs_gpu_workers=uses_cuda)
        if uses_cuda and self.gpu_start_method == "fork":
            self.gpu_start_method = "spawn"
        self.deterministic = options.deterministic
        self.worker_sink = self.writers is not None
        self.workers: list[_Worker] = []
        self.gpu_workers: list[_Worker] = []
        self.dispatcher: Optional[TaskDispatcher] = None
        self._feeder_errors: collections.deque[tuple[int, BaseException]] = collections.deque()
        self._wakeup_reader, self._wakeup_writer = multiprocessing.connection.Pipe(duplex=False)
        self._shutdown_lock = threading.Lock()
        self._is_shut_down = False

    # -- lifecycle ----------------------------------------------------------------------------
    def outputs(self) -> Iterator[TaskOutput]:
        try:
            self._start()
            yield from self._collect()
        except BaseException:
            self.shutdown(broken=True)
            raise
        self.shutdown(broken=False)

    def _start(self) -> None:
        # Serialize first: an unpicklable callable fails here, before any process exists.
        cpu_plan, forwards = split_plan(self.plan) if self.topology.gpu_devices else (self.plan, {})
        plan_bytes = dumps_plan((cpu_plan, self.finalize, self.writers), self.plan)
        gpu_channels = self._start_gpu_workers(forwards) if self.topology.gpu_devices else {}
        context: Any = multiprocessing.get_context(self.start_method)
        if self.start_method == "fork":
            _prepare_parent_for_fork()
        try:
            for index in range(self.num_workers):
                self._start_cpu_worker(context, index, plan_bytes, gpu_channels.get(index, {}))
        finally:
            if self.start_method == "fork":
                gc.unfreeze()

        window = REORDER_WINDOW_TASKS_PER_WORKER * self.num_workers if self.deterministic else None
        payloads = self.plan.source.iter_tasks(self.plan.task_size)
        self.dispatcher = TaskDispatcher(payloads, self.num_workers, MAX_TASKS_IN_FLIGHT_PER_WORKER, window)
        for worker in self.workers:
            worker.feeder = threading.Thread(
                target=feed_worker,
                args=(worker.id, self.dispatcher, worker.task_conn, self._on_sent, self._on_feeder_error, self._wake),
                name=f"streamproc-feeder-{worker.id.index}",
                daemon=True,
            )
            worker.feeder.start()

    def _start_cpu_worker(self, context: Any, index: int, plan_bytes: bytes, channels: dict[int, tuple[Any, Any]]) -> None:
        task_reader, task_writer = context.Pipe(duplex=False)
        result_reader, result_writer = context.Pipe(duplex=False)
        cycle = list(self.topology.cycles[index])
        process = context.Process(
            target=run_cpu_worker,
            args=(index, plan_bytes, task_reader, result_writer, os.getpid(), channels, cycle),
            name=f"streamproc-cpu-{index}",
            daemon=True,
        )
        self.workers.append(_Worker(WorkerId("cpu", index), process, task_writer, result_reader))
        process.start()
        # The child holds its own ends; closing ours lets a dead child break the pipes.
        task_reader.close()
        result_writer.close()
        for batch_writer, output_reader in channels.values():
            batch_writer.close()
            output_reader.close()

    def _start_gpu_workers(self, forwards: dict[int, Any]) -> dict[int, dict[int, tuple[Any, Any]]]:
        """Starts the GPU workers; returns each CPU worker's ends of its GPU channels."""
        forwards_bytes = dumps_plan((forwards, self.plan.options.autocast, self.plan.options.forward_threads), self.plan)
        context: Any = multiprocessing.get_context(self.gpu_start_method)
        cpu_ends: dict[int, dict[int, tuple[Any, Any]]] = collections.defaultdict(dict)
        gpu_ends: dict[int, list[tuple[int, Any, Any]]] = collections.defaultdict(list)
        for key in self.topology.channels:
            batch_reader, batch_writer = context.Pipe(duplex=False)
            output_reader, output_writer = context.Pipe(duplex=False)
            cpu_ends[key.src.index][key.dst.index] = (batch_writer, output_reader)
            gpu_ends[key.dst.index].append((key.src.index, batch_reader, output_writer))
        for index, device in enumerate(self.topology.gpu_devices):
            status_reader, status_writer = context.Pipe(duplex=False)
            process = context.Process(
                target=run_gpu_worker,
                args=(index, device, forwards_bytes, gpu_ends[index], status_writer, os.getpid()),
                name=f"streamproc-gpu-{index}",
                daemon=True,
            )
            self.gpu_workers.append(_Worker(WorkerId("gpu", index), process, None, status_reader))
            process.start()
            status_writer.close()
            for _, batch_reader, output_writer in gpu_ends[index]:
                batch_reader.close()
                output_writer.close()
        return cpu_ends

    def _on_sent(self, worker_index: int, task_index: int) -> None:
        self.workers[worker_index].dispatched.append(task_index)

    def _on_feeder_error(self, task_index: int, error: BaseException) -> None:
        self._feeder_errors.append((task_index, error))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wakeup_writer.send_bytes(b"")
        except OSError:  # closed during shutdown
            pass

    # -- collecting results -------------------------------------------------------------------
    def _collect(self) -> Iterator[TaskOutput]:
        assert self.dispatcher is not None
        dispatcher = self.dispatcher
        reorder = ReorderBuffer(self.deterministic)
        records_out = 0
        while True:
            for output in reorder.pop_ready():
                records_out += output.count
                yield output
            if self.deterministic:
                dispatcher.set_released(reorder.next_task)
            if dispatcher.total_tasks is not None and reorder.tasks_done >= dispatcher.total_tasks:
                if not self.worker_sink:
                    return
                # Worker-side sink: done once every worker has completed its part files.
                if all(w.sink_rows is not None for w in self.workers):
                    self._check_sink_rows(records_out)
                    return
            self._wait_and_receive(reorder)

    def _check_sink_rows(self, records_out: int) -> None:
        written = sum(w.sink_rows or 0 for w in self.workers)
        if written != records_out:
            raise PipelineShutdownError(
                f"the workers wrote {written} rows but produced {records_out} records: some part files are incomplete"
            )

    def _wait_and_receive(self, reorder: ReorderBuffer) -> None:
        live = [w for w in (*self.workers, *self.gpu_workers) if not w.finished]
        by_reader = {w.result_conn: w for w in live}
        by_sentinel = {w.process.sentinel: w for w in live}
        ready = multiprocessing.connection.wait([*by_reader, *by_sentinel, self._wakeup_reader], timeout=RESULT_WAIT_TIMEOUT_S)
        for obj in ready:
            if obj is self._wakeup_reader:
                while self._wakeup_reader.poll():
                    self._wakeup_reader.recv_bytes()
                while self._feeder_errors:
                    task_index, error = self._feeder_errors.popleft()
                    add_context_note(error, f"streamproc: raised while producing task {task_index} in the main process")
                    reorder.add_error(task_index, error)
            elif obj in by_reader:
                worker = by_reader[obj]
                self._receive_available(worker, reorder)
            else:
                self._check_exited(by_sentinel[obj], reorder)

    def _receive_available(self, worker: _Worker, reorder: ReorderBuffer) -> bool:
        """Reads the messages waiting on ``worker``'s result pipe, up to one finished task; False at end of pipe."""
        conn = worker.result_conn
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                return False  # the worker closed its end; its sentinel reports how it ended
            try:
                message = loads_message(data)
            except Exception as exc:
                raise SerializationError(f"a result from {worker.id} cannot be unpickled in the main process: {exc}") from exc
            self._handle(worker, message, reorder)
            # Stop after a finished task: each one frees an in-flight slot, the feeder sends the
            # worker another, and with fast workers this loop would go on receiving results, an
            # unbounded number of them buffered before the sink reads any (deterministic=False).
            if getattr(message, "last", True) or not conn.poll():
                return True

    def _handle(self, worker: _Worker, message: Any, reorder: ReorderBuffer) -> None:
        assert self.dispatcher is not None
        if isinstance(message, TaskChunk):
            reorder.add(TaskOutput(message.task_index, message.chunk, message.count, last=message.last))
            if message.last:
                worker.dispatched.popleft()
                self.dispatcher.task_finished(worker.id.index)
        elif isinstance(message, TaskFailed):
            worker.last_error = message.error
            reorder.add_error(message.task_index, message.error)
            # No task after a failed one is needed: stop handing them out.
            self.dispatcher.fail_at(message.task_index)
            if worker.dispatched and worker.dispatched[0] == message.task_index:
                worker.dispatched.popleft()
                self.dispatcher.task_finished(worker.id.index)
        elif isinstance(message, SinkClosed):
            worker.sink_rows = message.rows
        elif isinstance(message, WorkerFailed):
            raise message.error
        else:
            raise TypeError(f"unexpected message from {worker.id}: {message!r:.100}")

    def _check_exited(self, worker: _Worker, reorder: ReorderBuffer) -> None:
        """``worker``'s process ended: fine if it had finished its tasks, else a crash."""
        while worker.result_conn.poll() and self._receive_available(worker, reorder):
            pass  # results it sent before exiting
        worker.process.join(KILL_JOIN_TIMEOUT_S)
        exitcode = worker.process.exitcode
        # A GPU worker exits 0 once its CPU peers have all sent NoMoreBatches; a CPU worker
        # still waiting on it would see its pipe close and fail its task with a clear error.
        if exitcode == 0 and not worker.dispatched:
            worker.finished = True
            return
        if worker.last_error is not None:
            raise worker.last_error
        running = f" while running task {worker.dispatched[0]}" if worker.dispatched else ""
        raise WorkerCrashedError(
            f"{worker.id} (pid {worker.process.pid}) died unexpectedly{running}: "
            f"{format_exit_code(exitcode) if exitcode is not None else 'exit status unknown'}"
        )

    # -- shutdown -------------------------------------------------------------------------------
    def shutdown(self, broken: bool = False) -> None:
        """Stops and reaps every process and thread of this run. Idempotent; see the NOTE above."""
        with self._shutdown_lock:
            if self._is_shut_down:
                return
            self._is_shut_down = True
        if self.dispatcher is not None:
            self.dispatcher.stop()
        processes = [w.process for w in (*self.workers, *self.gpu_workers) if w.process.pid is not None]
        if broken:
            for process in processes:
                if process.is_alive():
                    process.terminate()
        deadline = time.monotonic() + SHUTDOWN_JOIN_TIMEOUT_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(KILL_JOIN_TIMEOUT_S)
        for worker in self.workers:
            if worker.feeder is not None:
                worker.feeder.join(SHUTDOWN_JOIN_TIMEOUT_S)
        for worker in (*self.workers, *self.gpu_workers):
            if worker.task_conn is not None:
                worker.task_conn.close()
            worker.result_conn.close()
            if worker.process.exitcode is not None:
                worker.process.close()
        self._wakeup_writer.close()
        self._wakeup_reader.close()
