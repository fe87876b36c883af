"""The threads backend: ``num_cpu_workers`` worker threads in the main process, nothing pickled.

Data flow (one process)::

    source.iter_tasks() -> TaskDispatcher <-next_task()- thread streamproc-thread-i: run_task
                           (reorder window)                (read, ops, forward, finalize)
    consumer (the caller's thread) <-TaskOutput / _TaskFailed / _ThreadExited- results queue
      -> ReorderBuffer (deterministic: task order) -> the sink

Memory invariant: queued chunks <= ``RESULT_QUEUE_CHUNKS_PER_THREAD * n``, plus one chunk per
thread waiting to enter the queue, plus (deterministic) the tasks of the reorder window,
``index < released + REORDER_WINDOW_TASKS_PER_THREAD * n``, and both in bytes too (the tasks'
payload estimates, the held outputs' :func:`~streamproc.execution.byte_budget.estimate_bytes`):
see NOTE [ streamproc byte bounds ] in :mod:`streamproc.execution.byte_budget`.

Shutdown, on every exit path (the end, an error, a break, ``close()``, garbage collection, a
KeyboardInterrupt in the consumer): the dispatcher hands out no more tasks, each thread drops
its task at the next chunk boundary (it checks the stop flag before each put), and the threads
are joined within ``SHUTDOWN_JOIN_TIMEOUT_S``. A thread still in user code then cannot be
killed: it is a daemon thread, left to stop at its next chunk boundary, and a warning names
the stage and task it is in.
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union, cast

from ..errors import PipelineShutdownError, add_context_note
from ..execution.byte_budget import default_byte_budget, estimate_bytes
from ..execution.context import ExecutionContext
from ..execution.dispatch import SourceFailed, TaskDispatcher
from ..execution.reorder import ReorderBuffer
from ..execution.task import ChunkFinalizer, Task, TaskOutput, iter_selected_payloads, run_task
from ..execution.timing import StageTimer, timed_payloads
from ..gpu.forward import set_torch_threads, shared_forward_runners
from ..gpu.model_cache import ModelSettings
from ..plan import Plan
from ..stage_tags import stage_running_in
from ..stats import ProcessStats, RunStats
from .base import Backend, BackendCapabilities, RunHandle
from .multiprocessing.cpu_budget import default_num_cpu_workers
from .multiprocessing.log_forwarding import tag_thread_logs
from .simple import check_forward_device, refuse_task_timeout

if TYPE_CHECKING:
    from ..io.sinks import Sink

#: A thread runs its task to the end before it asks for the next one.
MAX_TASKS_IN_FLIGHT_PER_THREAD = 1
#: Deterministic runs: how many tasks past the oldest one not yet delivered may run, per thread.
REORDER_WINDOW_TASKS_PER_THREAD = 4
#: Output chunks waiting for the consumer, per thread.
RESULT_QUEUE_CHUNKS_PER_THREAD = 2
#: How long a blocked put (thread) or get (consumer) lasts before it re-checks the stop flag
#: (thread) or whether any thread is alive (consumer).
QUEUE_POLL_INTERVAL_S = 0.1
#: How long shutdown waits for all the threads together before it leaves them running.
SHUTDOWN_JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class _TaskFailed:
    """Task ``task_index`` raised ``error`` (in user code, or in the source reading it)."""

    task_index: int
    error: BaseException


@dataclass(frozen=True)
class _ThreadExited:
    """A thread's last message; ``error``: a failure of streamproc itself, which ended it."""

    error: Optional[BaseException] = None


_Message = Union[TaskOutput, _TaskFailed, _ThreadExited]


class _ThreadRun:
    """One run of a plan over ``num_threads`` worker threads; see the module docstring."""

    def __init__(self, plan: Plan, finalize: Optional[ChunkFinalizer], num_threads: int, stats: RunStats) -> None:
        self.plan = plan
        self.finalize = finalize
        self.deterministic = plan.options.deterministic
        window = REORDER_WINDOW_TASKS_PER_THREAD * num_threads if self.deterministic else None
        #: The run's stats; each thread's waits go to its own ``thread_stats`` entry.
        self.stats = stats
        payloads = timed_payloads(iter_selected_payloads(plan), stats.main)  # a generator: reads nothing yet
        self.dispatcher = TaskDispatcher(
            payloads, num_threads, MAX_TASKS_IN_FLIGHT_PER_THREAD, window,
            byte_budget=default_byte_budget(), task_bytes=plan.source.task_bytes,
        )
        self.results: queue.Queue[_Message] = queue.Queue(RESULT_QUEUE_CHUNKS_PER_THREAD * num_threads)
        self.forward_runners = shared_forward_runners(
            plan.options.gpu_worker_devices, plan.options.autocast, ModelSettings.from_options(plan.options)
        )
        self.stopping = threading.Event()
        #: The task each thread runs (None: between tasks, or reading the source).
        self.running: list[Optional[int]] = [None] * num_threads
        self.threads = [
            threading.Thread(target=self._work, args=(i,), name=f"streamproc-thread-{i}", daemon=True) for i in range(num_threads)
        ]
        self.thread_stats = [ProcessStats(f"thread {thread.name}", "thread") for thread in self.threads]
        #: Each thread's stage timer (made by the thread): its figures are added at shutdown.
        self.timers: list[Optional[StageTimer]] = [None] * num_threads
        self._started = time.perf_counter()
        self._shutdown_lock = threading.Lock()
        self._is_shut_down = False
        self._restore_torch_threads: Callable[[], None] = lambda: None

    def outputs(self) -> Generator[TaskOutput, None, None]:
        """The consumer's side (the caller's thread): outputs in order, errors in their place."""
        try:
            # torch's thread count is process-wide: set once for the run, not around each forward,
            # whose set-and-restore would race between threads.
            if self.plan.has_gpu_stage:
                self._restore_torch_threads = set_torch_threads(self.plan.options.forward_threads)
            for thread in self.threads:
                thread.start()
            reorder = ReorderBuffer(self.deterministic)
            while True:
                yield from reorder.pop_ready()  # raises a task's error after the outputs before it
                if self.deterministic:
                    self.dispatcher.set_released(reorder.next_task, reorder.buffered_bytes)
                if self.dispatcher.total_tasks is not None and reorder.tasks_done >= self.dispatcher.total_tasks:
                    break
                waited = time.perf_counter()
                message = self._next_message()
                if self.deterministic and reorder.buffered_tasks:  # outputs held behind an earlier task
                    self.stats.main.reorder_wait_seconds += time.perf_counter() - waited
                if isinstance(message, TaskOutput):
                    # Sized only where it may wait in the buffer (nothing is pickled here).
                    reorder.add(message, estimate_bytes(message.chunk) if self.deterministic else 0)
                elif isinstance(message, _TaskFailed):
                    reorder.add_error(message.task_index, message.error)
                elif message.error is not None:
                    raise message.error
        except BaseException:
            self.shutdown()
            raise
        self.shutdown()

    def _next_message(self) -> _Message:
        while True:
            try:
                return self.results.get(timeout=QUEUE_POLL_INTERVAL_S)
            except queue.Empty:
                # Every task reports its outputs or its error before its thread exits.
                if self.results.empty() and not any(thread.is_alive() for thread in self.threads):
                    raise PipelineShutdownError("every worker thread ended before the run was complete") from None

    def _work(self, worker: int) -> None:
        """Body of thread ``streamproc-thread-<worker>``: runs tasks until the dispatcher has none.

        Per task it puts the task's :class:`TaskOutput` chunks, the last with ``last=True``, or
        the chunks completed before an error and then ``_TaskFailed`` (a source error fails
        the task being read); at the end, ``_ThreadExited``. Once the run stops it puts nothing.
        """
        name = threading.current_thread().name
        error: Optional[BaseException] = None
        tag_thread_logs(f"thread worker {worker}")  # its log records name it, as a worker process's do
        try:
            devices = self.plan.options.gpu_worker_devices
            ctx = ExecutionContext(
                f"thread {name}", make_forward_runner=self.forward_runners, device=devices[0] if devices else None,
                kind="thread", index=worker, forward_here=True,
            )
            # Each thread reads tasks through its own copy of the source's worker half (what a
            # worker process unpickles): a source may cache a file handle that one thread at a
            # time can use (ParquetSource keeps its last ParquetFile open).
            plan = dataclasses.replace(self.plan, source=copy.copy(self.plan.source))
            timer = self.timers[worker] = StageTimer(plan, ctx)
            own = self.thread_stats[worker]
            while True:
                waited = time.perf_counter()
                try:
                    task = self.dispatcher.next_task(worker)
                except SourceFailed as failure:
                    add_context_note(failure.error, f"streamproc: raised while producing task {failure.index} in {name}")
                    self._put(_TaskFailed(failure.index, failure.error))
                    break
                finally:
                    own.input_wait_seconds += time.perf_counter() - waited
                if task is None or self.stopping.is_set():  # stopped while it read the source
                    break
                self.running[worker] = task.index
                try:
                    self._run_task(plan, task, ctx, name, timer)
                finally:
                    self.running[worker] = None
                    self.dispatcher.task_finished(worker, task.index)
        except BaseException as exc:  # a failure of streamproc itself: the consumer raises it
            error = exc
        finally:
            self._put(_ThreadExited(error))

    def _run_task(self, plan: Plan, task: Task, ctx: ExecutionContext, name: str, timer: StageTimer) -> None:
        outputs = cast(Generator[TaskOutput, None, None], run_task(plan, task, ctx, self.finalize, timer))
        own = self.thread_stats[self.threads.index(threading.current_thread())]
        try:
            for output in outputs:
                blocked = time.perf_counter()
                put = self._put(output)
                own.output_blocked_seconds += time.perf_counter() - blocked
                if not put:
                    return  # the run stopped: drop the task at this chunk boundary
        except BaseException as exc:  # SystemExit too: the consumer raises it, as the simple backend does
            if isinstance(exc, Exception):
                add_context_note(exc, f"streamproc: while running task {task.index} in {name} (threads backend)")
            self.dispatcher.fail_at(task.index)  # no task after a failed one is needed
            self._put(_TaskFailed(task.index, exc))
        finally:
            outputs.close()

    def _put(self, message: _Message) -> bool:
        """Hands ``message`` to the consumer; False (dropped) once the run is stopping."""
        while not self.stopping.is_set():
            try:
                self.results.put(message, timeout=QUEUE_POLL_INTERVAL_S)
                return True
            except queue.Full:
                pass
        return False

    def shutdown(self) -> None:
        """Stops the run and joins its threads within ``SHUTDOWN_JOIN_TIMEOUT_S`` (idempotent)."""
        with self._shutdown_lock:
            if self._is_shut_down:
                return
            self._is_shut_down = True
        self.stopping.set()
        self.dispatcher.stop()
        # Garbage collection may run this in one of the threads, which cannot join itself.
        others = [t for t in self.threads if t is not threading.current_thread() and t.ident is not None]
        deadline = time.monotonic() + SHUTDOWN_JOIN_TIMEOUT_S
        for thread in others:
            thread.join(max(0.0, deadline - time.monotonic()))
        for worker, thread in enumerate(self.threads):
            if thread in others and thread.is_alive():
                task = self.running[worker]
                where = f"{stage_running_in(thread)} of task {task}" if task is not None else "the source, reading a task"
                warnings.warn(
                    f"streamproc: worker thread {thread.name} is still in {where} {SHUTDOWN_JOIN_TIMEOUT_S} s after the "
                    "run stopped; a thread cannot be killed: it is left running (a daemon thread) until its next chunk",
                    RuntimeWarning,
                    stacklevel=2,
                )
        while not self.results.empty():  # drop the outputs nobody will read
            self.results.get_nowait()
        self._restore_torch_threads()
        wall = time.perf_counter() - self._started
        for own, timer, thread in zip(self.thread_stats, self.timers, self.threads):
            own.wall_seconds = wall
            self.stats.add_process(own)
            # What the thread's tasks measured since its last output with stats (not a thread left running).
            rest = timer.take() if timer is not None and not thread.is_alive() else None
            if rest is not None:
                self.stats.add_task(rest)
        self.forward_runners.add_swap_stats(self.stats.main)  # swaps under gpu_memory_budget


class ThreadsBackend(Backend):
    """Worker threads in the main process, for ops that wait (I/O) or release the GIL.

    ``num_cpu_workers`` threads (default: as many as the multiprocessing backend's CPU
    workers) run every op, ``forward`` of ``map_gpu`` stages included. Nothing is pickled, so
    callables may close over open files, locks and connections. ``max_task_retries`` has no
    effect (no worker process can die apart from this one); ``task_timeout`` is refused at run
    start (a thread cannot be stopped; see :func:`.simple.refuse_task_timeout`).
    """

    name = "threads"
    capabilities = BackendCapabilities(writes_in_workers=False, separate_processes=False)

    def run(self, plan: Plan, sink: Sink) -> RunHandle:
        refuse_task_timeout(plan, self.name)
        options = plan.options
        if plan.has_gpu_stage and options.effective_gpu_workers > 1:
            raise ValueError(
                f"backend='threads' runs forward in its worker threads on one device, but num_gpu_workers="
                f"{options.effective_gpu_workers} (gpu_worker_devices={options.gpu_worker_devices}): "
                "use backend='multiprocessing' for several GPU workers"
            )
        check_forward_device(plan)
        stats = RunStats(self.name)
        run = _ThreadRun(plan, sink.finalizer(), options.num_cpu_workers or default_num_cpu_workers(0), stats)
        outputs = run.outputs()
        weakref.finalize(outputs, run.shutdown)  # a handle garbage collected half-read stops its threads
        return RunHandle(outputs, stats)
