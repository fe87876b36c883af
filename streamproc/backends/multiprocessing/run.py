"""One run of the multiprocessing backend: feed tasks to a pool's CPU workers, collect, reorder.

Data flow (all pipes are one-way ``multiprocessing.Pipe``s; processes are the pool's)::

    main process                                          CPU worker i (process streamproc-cpu-i)
    ------------                                          -------------------------------------
    source.iter_tasks() --> TaskDispatcher
      (one lock; bounds: in-flight per worker,
       reorder window, both in bytes too)
          |  next_task()
          v
    feeder thread i --StartRun, Task...Task, EndRun--> task pipe i --> read_task -> ops -> finalize
                                                                           |    (map_gpu: batches
    collector (the sink's thread)  <--TaskChunk/TaskFailed-- result pipe i <--+    to GPU workers)
      wait(result pipes + process sentinels + wakeup pipe)
      -> ReorderBuffer (deterministic: task order) -> TaskOutput to the sink

NOTE [ streamproc shutdown ]
    Every exit path goes through :meth:`_Run.shutdown`, which is idempotent (a lock and a
    flag). It stops the dispatcher (feeders hand out no more tasks), then:
    * after a complete run, every feeder has sent ``EndRun`` and exits; the pool sends each
      CPU worker ``Stop``, the workers exit by themselves (GPU workers once every CPU peer
      said ``NoMoreBatches``) and are joined with a timeout;
    * on any other path (user error, worker crash, consumer breaking out of the loop,
      ``close()``/garbage collection of the iterator, KeyboardInterrupt) the remaining work is
      not needed: workers are terminated first, so that no feeder stays blocked sending to a
      worker that is itself blocked sending results nobody reads.
    Worker deaths are survivable with ``max_task_retries`` and stuck tasks are detected with
    ``task_timeout``: see NOTE [ streamproc retries ] in :mod:`.retries`.
    Feeder threads are joined against one shared deadline (the one blocked inside the user's
    source, which nothing can interrupt, gets ``SOURCE_RETURN_GRACE_S``, then a warning); workers still alive after
    ``SHUTDOWN_JOIN_TIMEOUT_S`` are killed (SIGKILL); then every pipe end is closed. Nothing
    here waits without a timeout. During a run no worker ends by itself: any worker exit
    before shutdown, whatever its exit code, is a crash. (A GPU worker that says
    ``WorkerDone`` ended because every CPU peer stopped, which during a run only a dying CPU
    worker does: that worker's exit is the crash reported.)
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing.connection
import threading
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any, Optional

from ...errors import PipelineShutdownError, SerializationError, add_context_note
from ...execution.byte_budget import default_byte_budget
from ...execution.dispatch import TaskDispatcher
from ...execution.reorder import ReorderBuffer
from ...execution.serialization import dumps_message, dumps_plan, dumps_worker_plan, loads_message
from ...execution.shared_weights import WeightShipper, pool_weight_shipper
from ...execution.split import split_plan
from ...execution.task import TaskOutput, iter_selected_payloads
from ...execution.timing import timed_payloads
from ...gpu.model_cache import ModelSettings
from ...plan import Plan
from ...stats import RunStats
from .feeder import WorkerSlot, feed_worker, join_feeders
from .lease import receive_routed
from .log_forwarding import capture_log_levels, reemit
from .messages import (
    EndRun,
    LogRecordMessage,
    RecordStarted,
    RunEnded,
    StartRun,
    TaskChunk,
    TaskFailed,
    TaskStuck,
    WorkerDone,
    WorkerFailed,
    WorkerStarted,
)
from .pool import KILL_JOIN_TIMEOUT_S, ProcessPool, WorkerHandle
from .recovery import RecoveryMixin, WorkerAssignment
from .result_wait import ResultWaiter
from .retries import TaskRetries
from .tensor_transport import sweep_segments

if TYPE_CHECKING:
    from ...io.sinks import Sink
    from .lease import RunLease

#: Tasks sent to one worker and not finished: one running, one waiting in its pipe.
MAX_TASKS_IN_FLIGHT_PER_WORKER = 2
#: Deterministic runs: how many tasks past the oldest unfinished one may be handed out, per worker.
REORDER_WINDOW_TASKS_PER_WORKER = 4
#: Both windows are bounded in bytes as well (task payload estimates; the outputs' pickled
#: message lengths): see NOTE [ streamproc byte bounds ] in :mod:`streamproc.execution.byte_budget`.
#: Upper bound of one wait for results; sentinels wake us at once when a worker dies.
RESULT_WAIT_TIMEOUT_S = 1.0

_run_ids = itertools.count(1)


class _Run(RecoveryMixin):
    """One execution of a plan on a pool. Owns its threads; see NOTE [ streamproc shutdown ]."""

    def __init__(
        self, plan: Plan, sink: Sink, pool: ProcessPool, stats: Optional[RunStats] = None, lease: Optional[RunLease] = None
    ) -> None:
        self.plan = plan
        self.pool = pool
        #: A warm pool's lease (None: the run starts and stops ``pool`` itself).
        self.lease = lease
        #: Filled with what the workers report (``RunEnded``/``WorkerDone``) and the main process's waits.
        self.stats = stats if stats is not None else RunStats("multiprocessing")
        self.run_id = next(_run_ids)
        self.finalize = sink.finalizer()
        self.writers = sink.worker_writers() if sink.in_workers else None
        self.deterministic = plan.options.deterministic
        self.num_workers = pool.topology.num_cpu_workers
        self.assigned = [WorkerAssignment() for _ in range(self.num_workers)]
        self.dispatcher: Optional[TaskDispatcher] = None
        self._feeder_errors: collections.deque[tuple[int, BaseException]] = collections.deque()
        self._wakeup_reader: Any = None
        self._wakeup_writer: Any = None
        self._waiter: Optional[ResultWaiter] = None
        self._shutdown_lock = threading.Lock()
        self._is_shut_down = False
        options = plan.options
        self.retries = TaskRetries(
            options.max_task_retries, options.on_error != "raise", options.task_timeout, plan.source.locate
        )
        # A dead worker's part files are lost with it: no retries when the workers write.
        self.replaces_workers = self.retries.enabled and self.writers is None
        self.reorder = ReorderBuffer(self.deterministic, hold_tasks=self.replaces_workers)
        self.weights: Optional[WeightShipper] = None

    # -- lifecycle ----------------------------------------------------------------------------
    def outputs(self) -> Generator[TaskOutput, None, None]:
        try:
            started = time.perf_counter()
            self._start()  # serialize the plan, start the workers: the main process's start-up
            self.stats.main.startup_seconds = time.perf_counter() - started
            yield from self._collect()
        except BaseException:
            self.shutdown(broken=True)
            raise
        self.shutdown(broken=False)

    def _start(self) -> None:
        # Serialize first: an unpicklable callable fails here, before any process exists.
        cpu_plan, forwards = split_plan(self.plan) if self.pool.topology.gpu_devices else (self.plan, {})
        log_levels = capture_log_levels()
        # Models' weights travel once, beside the plans (NOTE [ streamproc weights shipping ]):
        # inherited by workers forked after this, else written once (a warm pool: once per pool).
        warm_pool = getattr(self.lease, "pool", None)
        self.weights = WeightShipper() if warm_pool is None else pool_weight_shipper(warm_pool)
        forks_now = self.lease is None  # a warm pool's processes exist already
        plan_bytes = dumps_worker_plan(
            self.plan, cpu_plan, self.finalize, self.writers,
            weights=self.weights, inherit=forks_now and self.pool.cpu_start_method == "fork",
        )
        start = StartRun(self.run_id, plan_bytes, log_levels, per_task_stats=self.replaces_workers)
        options = self.plan.options
        gpu_setup = (forwards, options.autocast, options.forward_threads, log_levels, ModelSettings.from_options(options))
        inherit_gpu = forks_now and self.pool.gpu_start_method == "fork"
        forwards_bytes = dumps_plan(gpu_setup, self.plan, self.weights, inherit_gpu) if forwards else None
        if self.lease is None:
            self.pool.start(forwards_bytes, options.task_timeout, replaceable=self.replaces_workers)
        # Created after the workers: no child inherits it (a replacement is told to close it).
        self._wakeup_reader, self._wakeup_writer = multiprocessing.connection.Pipe(duplex=False)
        self._waiter = ResultWaiter(self._wakeup_reader)
        if self.lease is not None:  # a warm pool's processes: wait for the pool, send its GPU workers this run's forwards
            self.lease.begin(self, forwards_bytes)
        window = REORDER_WINDOW_TASKS_PER_WORKER * self.num_workers if self.deterministic else None
        payloads = timed_payloads(iter_selected_payloads(self.plan), self.stats.main)
        if self.writers is not None:  # workers write whole parts: a dispatch unit is a part group
            payloads = self.writers.dispatch_units(payloads)
        self.dispatcher = TaskDispatcher(
            payloads, self.num_workers, MAX_TASKS_IN_FLIGHT_PER_WORKER, window, run_id=self.run_id,
            hold_until_finished=self.replaces_workers, byte_budget=default_byte_budget(),
            # A part group (workers write) is sized by its count: its payload is not the source's.
            task_bytes=self.plan.source.task_bytes if self.writers is None else None,
        )
        first, last = dumps_message(start), dumps_message(EndRun(self.run_id))
        for worker, assignment in zip(self.pool.cpu_workers, self.assigned):
            assignment.slot = (
                self.lease.slot(worker, first, last, self.retries.encode)  # shared with other runs, or not
                if self.lease is not None
                else WorkerSlot(
                    worker.task_conn, first, last, self.retries.encode, self.replaces_workers,
                    keeps_payloads=self.replaces_workers or options.task_timeout is not None,
                )
            )
            assignment.feeder = threading.Thread(
                target=feed_worker,
                args=(worker.id, self.dispatcher, assignment.slot, self._on_feeder_error, self._wake),
                name=f"streamproc-feeder-{worker.id.index}",
                daemon=True,
            )
            assignment.feeder.start()

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
        reorder = self.reorder
        records_out = 0
        while True:
            for output in reorder.pop_ready():
                records_out += output.count
                yield output
            if self.deterministic:
                dispatcher.set_released(reorder.next_task, reorder.buffered_bytes)
            if dispatcher.total_tasks is not None and reorder.tasks_done >= dispatcher.total_tasks:
                if self.writers is None:
                    return
                # Workers write their own parts: done once every worker has completed them.
                if all(a.ended is not None for a in self.assigned):
                    self._check_rows_written(records_out)
                    return
            if self.deterministic and reorder.buffered_tasks:  # outputs held behind an earlier task
                start = time.perf_counter()
                self._wait_and_receive(reorder)
                self.stats.main.reorder_wait_seconds += time.perf_counter() - start
            else:
                self._wait_and_receive(reorder)

    def _check_rows_written(self, records_out: int) -> None:
        written = sum(a.ended.rows or 0 for a in self.assigned if a.ended is not None)
        if written != records_out:
            raise PipelineShutdownError(
                f"the workers wrote {written} rows but produced {records_out} records: some part files are incomplete"
            )

    def _wait_and_receive(self, reorder: ReorderBuffer) -> None:
        timeout = self.plan.options.task_timeout
        wait_s = RESULT_WAIT_TIMEOUT_S if timeout is None else min(RESULT_WAIT_TIMEOUT_S, timeout / 4)
        if self.lease is not None and self.lease.inbox is not None:  # the pool's router reads the pipes
            receive_routed(self, self.lease.inbox, reorder, wait_s)
            return
        assert self._waiter is not None
        ready = self._waiter.wait(self.pool.live_workers(), wait_s)
        if timeout is not None:
            self._check_backstop(timeout)
        for what, worker in ready:
            if worker is None:
                self._take_feeder_errors(reorder)
            elif what == "result":
                self._receive_available(worker, reorder)
            else:
                self._worker_exited(worker, reorder)

    def _take_feeder_errors(self, reorder: ReorderBuffer) -> None:
        while self._wakeup_reader.poll():
            self._wakeup_reader.recv_bytes()
        while self._feeder_errors:
            task_index, error = self._feeder_errors.popleft()
            add_context_note(error, f"streamproc: raised while producing task {task_index} in the main process")
            reorder.add_error(task_index, error)

    def _receive_available(self, worker: WorkerHandle, reorder: ReorderBuffer) -> bool:
        """Reads the messages waiting on ``worker``'s pipe, up to one finished task; False at end of pipe."""
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
            self._handle(worker, message, reorder, len(data))
            # Stop after a finished task: each one frees an in-flight slot, the feeder sends the
            # worker another, and with fast workers this loop would go on receiving results, an
            # unbounded number of them buffered before the sink reads any (deterministic=False).
            if getattr(message, "last", True) or not conn.poll():
                return True

    def _handle(self, worker: WorkerHandle, message: Any, reorder: ReorderBuffer, nbytes: int = 0) -> None:
        """Acts on one message from ``worker``, ``nbytes`` long as it came through the pipe."""
        assert self.dispatcher is not None
        if isinstance(message, (TaskChunk, TaskFailed, RunEnded)) and message.run_id != self.run_id:
            raise PipelineShutdownError(f"{worker.id} answered for run {message.run_id} during run {self.run_id}")
        if isinstance(message, (TaskChunk, TaskFailed, RecordStarted, TaskStuck)) and message.task_index not in self.held(worker):
            return  # a message about a task this worker no longer holds (it was killed meanwhile)
        if isinstance(message, TaskChunk):
            reorder.add(self.retries.on_output(message.output) if self.replaces_workers else message.output, nbytes)
            if message.output.last:
                self._task_done(worker, message.task_index)
        elif isinstance(message, RecordStarted):
            self.retries.record_started(message)
        elif isinstance(message, TaskStuck):
            self._task_stuck(worker, message)
        elif isinstance(message, TaskFailed):
            self._raise_if_gpu_worker_gone(message.error)
            self.assigned[worker.id.index].last_error = message.error
            reorder.add_error(message.task_index, message.error)
            # No task after a failed one is needed: stop handing them out.
            self.dispatcher.fail_at(message.task_index)
            self._task_done(worker, message.task_index)
        elif isinstance(message, LogRecordMessage):
            reemit(message)
        elif isinstance(message, WorkerStarted):
            worker.started = True
        elif isinstance(message, RunEnded):
            self.assigned[worker.id.index].ended = message
            self._add_worker_stats(message)
        elif isinstance(message, WorkerFailed):
            raise message.error
        elif isinstance(message, WorkerDone):  # a GPU worker's normal end: its sentinel follows
            worker.done = True
            self._add_worker_stats(message)
        else:
            raise TypeError(f"unexpected message from {worker.id}: {message!r:.100}")

    def _add_worker_stats(self, report: RunEnded | WorkerDone) -> None:
        """Merges what a worker measured (its process figures; a CPU worker's tasks not yet sent)."""
        if report.stats is not None:
            self.stats.add_process(report.stats)
        tasks = report.tasks if isinstance(report, RunEnded) else None
        if tasks is not None:
            self.stats.add_task(tasks)

    def _raise_if_gpu_worker_gone(self, error: BaseException) -> None:
        """A CPU worker found a GPU worker gone: report that GPU worker's crash, with its exit code."""
        gone = getattr(error, "gpu_worker_gone", None)
        if gone is None:
            return
        gpu = self.pool.gpu_workers[gone]
        gpu.process.join(KILL_JOIN_TIMEOUT_S)
        if gpu.process.exitcode is None:
            return  # still running (an unexpected closed pipe): the CPU worker's error stands
        self.pool.reap(gpu)
        crash = gpu.crash_error(" during the run")
        raise crash from error

    def held(self, worker: WorkerHandle) -> list[int]:
        """The task indices ``worker``'s current process holds (GPU workers: none to check)."""
        if worker.id.kind != "cpu":
            return []
        return self.assigned[worker.id.index].held()

    def _task_done(self, worker: WorkerHandle, task_index: int) -> None:
        assert self.dispatcher is not None
        assignment = self.assigned[worker.id.index]
        if assignment.slot is not None and assignment.slot.finished(task_index):
            assignment.running_since = time.monotonic()
            self.dispatcher.task_finished(worker.id.index, task_index)

    def _worker_exited(self, worker: WorkerHandle, reorder: ReorderBuffer) -> None:
        """``worker``'s process ended during the run: a crash (see the NOTE above), its own or a peer's."""
        conn: Any = worker.result_conn
        while conn.poll() and self._receive_available(worker, reorder):
            pass  # what it sent before exiting (the user error of a sys.exit, for example)
        self.pool.reap(worker)
        if worker.id.kind == "cpu":
            assignment = self.assigned[worker.id.index]
            if assignment.last_error is not None:
                raise assignment.last_error
            held = assignment.held()
            doing = f" while running task {held[0]}" if held else ""
            if assignment.stuck is not None and not self.replaces_workers:
                raise self.retries.timeout_error(assignment.stuck, assignment.slot.tasks[held[0]])  # type: ignore[union-attr]
            if not self.replaces_workers:
                raise worker.crash_error(doing)
            self._replace_worker(worker, worker.crash_error(doing), reorder)
            return
        if worker.done:
            # It ended normally because every CPU peer stopped, which during a run only a
            # dying CPU worker does: that worker's own exit is the crash to report.
            return
        raise worker.crash_error(" during the run")

    # -- shutdown -------------------------------------------------------------------------------
    def shutdown(self, broken: bool = False) -> None:
        """Stops and reaps every process and thread of this run. Idempotent; see the NOTE above."""
        with self._shutdown_lock:
            if self._is_shut_down:
                return
            self._is_shut_down = True
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self.lease is not None:  # a warm pool: drain the run, keep the workers (service/drain.py)
            try:
                self.lease.end(self, broken)
            finally:
                self._close_wakeup()
            return
        if broken:
            self.pool.terminate()  # no feeder may stay blocked sending to a busy worker
        reader = self.dispatcher.reader if self.dispatcher is not None else None
        stuck = join_feeders([assignment.feeder for assignment in self.assigned], reader, self.plan.source.describe())
        try:
            self.pool.shutdown(broken=broken or stuck)
        finally:
            if self.weights is not None:  # the workers are gone (a warm pool's weights stay: see above)
                self.weights.close()
        sweep_segments()  # what killed workers left in /dev/shm (see tensor_transport)
        # A CPU worker's RunEnded may follow the last output; GPU workers end after the CPU workers.
        for report in self.pool.final_reports:
            self._add_worker_stats(report)
        self._close_wakeup()

    def _close_wakeup(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
        if self._wakeup_writer is not None:
            self._wakeup_writer.close()
            self._wakeup_reader.close()
