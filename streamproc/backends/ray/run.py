"""One run of the Ray backend: the driver hands tasks to CPU worker actors, collects, reorders.

Data flow (actors are Ray actors on any node; arrows are actor calls through the object store)::

    driver (main process)                        CPU worker actor i                 GPU worker actor j
    ---------------------                        ------------------                 ------------------
    source.iter_tasks() -> ActorDispatch
      (bounds: in flight per actor,
       reorder window)
          | run_task(Task)  ------------------>  read_task -> ops -> prepare_batch --forward(batch)-->  to device, forward
          |                                      postprocess -> ops -> finalize   <----outputs------   to host
    collector: ray.wait(task refs)  <--TaskResult (chunks; part-file counts when it writes)--
      -> ReorderBuffer (deterministic: task order) -> TaskOutput to the sink

The plan goes to the object store once (``ray.put``); every CPU actor loads it once, in
``begin_run``. Start-up overlaps: every actor of the run is created at once, each is sent
``begin_run`` as soon as it exists (Ray queues the call until its process is up), and tasks go
to each actor as soon as its ``begin_run`` answers, so the first tasks run while the other
actors still start. The CPU worker actors of a completed run stay warm for the next run with
the same sizing (see :mod:`.actor_pool`). A task's payload is a descriptor for splittable
sources (a parquet row group, a byte range), read by the actor from a path every node sees;
only an in-memory source's tasks carry their records.

NOTE [ streamproc ray shutdown ]
    Every exit path (the end, a user error, an actor crash, the consumer breaking out of the
    loop, ``close()``/garbage collection of the iterator, KeyboardInterrupt, which reaches
    the driver inside a bounded ``ray.wait``) goes through :meth:`_RayRun.shutdown`, which is
    idempotent (a lock and a flag). It closes the source's task generator (a ``limit``'s inner
    run stops its own actors there), kills every actor this run used (``ray.kill``, no
    restart: tasks still running are not needed), warm ones taken from the pool included,
    drops the plan's object, then waits up to ``SHUTDOWN_WAIT_S`` for the actors' names to
    leave the cluster, so that the next run finds their resources free. One exception: a run
    that completed (every output delivered, every actor's ``end_run`` answered) hands its CPU
    worker actors, idle and holding no resource, to :mod:`.actor_pool`, which says when they
    go. It never calls ``ray.shutdown()``: the cluster (the user's, or the local one
    streamproc started, which lives until the interpreter exits) stays as it was.
    An actor that dies during the run fails the calls waiting on it (``RayActorError``):
    ``max_task_retries`` reruns its tasks on a fresh actor, else the run raises
    ``WorkerCrashedError`` naming the actor, its pid and its node.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional

from ...errors import PipelineShutdownError, SerializationError, WorkerCrashedError, add_context_note
from ...execution.reorder import ReorderBuffer
from ...execution.schedule import get_dispatch_schedule
from ...execution.serialization import dumps_message, dumps_plan, dumps_worker_plan, loads_message
from ...execution.split import split_plan
from ...execution.task import Task, TaskOutput, iter_selected_payloads
from ...execution.timing import timed_payloads
from ...plan import Plan
from ...stats import RunStats
from .actor_pool import PoolKey, keep_warm, kill_actors, pool_key, take_warm
from .actors import ACTOR_START_TIMEOUT_S, RunActor, await_gpu_places, first_line, wait_until_gone
from .cluster import ActorSizing, alive_node_cpus, size_actors, spread_over_nodes
from .cpu import RunEnd, TaskResult
from .dispatch import ActorDispatch
from .gpu import ActorStarted
from .launch import start_cpu_actor, start_gpu_actors

if TYPE_CHECKING:
    from ...io.sinks import Sink

#: Tasks submitted to one actor and not answered: one running, one queued in the actor.
MAX_TASKS_IN_FLIGHT_PER_ACTOR = 2
#: Deterministic runs: how many tasks past the oldest one not delivered may be handed out, per actor.
REORDER_WINDOW_TASKS_PER_ACTOR = 4
#: Upper bound of one wait for results: a KeyboardInterrupt is seen at least this often.
RESULT_WAIT_TIMEOUT_S = 1.0
#: How long the end of a run waits for the actors' part files and stats.
RUN_END_TIMEOUT_S = 60.0
_run_ids = itertools.count(1)
@dataclass(frozen=True)
class _Starting:
    """A ``begin_run`` call not answered yet: CPU actor ``worker`` of generation ``generation``."""

    worker: int
    generation: int
    since: float


@dataclass(frozen=True)
class _InFlight:
    """A task submitted to CPU actor ``worker`` (of generation ``generation``), on attempt ``attempt``."""

    worker: int
    generation: int
    task: Task
    attempt: int = 0


class _RayRun:
    """One execution of a plan on Ray actors. See the module docstring and NOTE [ streamproc ray shutdown ]."""

    def __init__(self, plan: Plan, sink: Sink, ray: ModuleType, stats: RunStats) -> None:
        self.plan = plan
        self.ray = ray
        self.stats = stats
        self.run_id = next(_run_ids)
        #: Names every actor of the run: unique on the cluster (several drivers may share it).
        self.token = f"streamproc-{uuid.uuid4().hex[:8]}-{self.run_id}"
        self.finalize = sink.finalizer()
        self.writers = sink.worker_writers() if sink.in_workers else None
        self.deterministic = plan.options.deterministic
        self.max_task_retries = plan.options.max_task_retries if self.writers is None else 0
        self.cpu: list[RunActor] = []
        self.gpu: list[RunActor] = []
        self.created: list[RunActor] = []  # every actor started, replaced ones included
        self.pending: dict[Any, _InFlight] = {}
        self.starting: dict[Any, _Starting] = {}
        self._started_at = time.perf_counter()
        self._first_ready = False
        self._completed = False
        self._pool_key: Optional[PoolKey] = None
        self._nodes: Optional[list[Optional[str]]] = None
        self._num_cpu = 0
        self.reorder = ReorderBuffer(self.deterministic)
        self.dispatch: Optional[ActorDispatch[_InFlight]] = None
        self.payloads: Optional[Iterator[tuple[int, Any]]] = None
        self._plan_ref: Any = None
        self._sizing: Optional[ActorSizing] = None
        self._records_out = 0
        self._shutdown_lock = threading.Lock()
        self._is_shut_down = False

    # -- lifecycle ----------------------------------------------------------------------------
    def outputs(self) -> Generator[TaskOutput, None, None]:
        try:
            self._started_at = time.perf_counter()
            self._start()  # serialize the plan, ask for the actors (answers come while collecting)
            yield from self._collect()
            self._end_run()
            self._completed = True
        except BaseException:
            self.shutdown()
            raise
        self.shutdown()

    def _start(self) -> None:
        ray, plan, options = self.ray, self.plan, self.plan.options
        total = ray.cluster_resources()
        sizing = size_actors(plan, float(total.get("CPU", 0)), float(total.get("GPU", 0)))
        # Serialize first: an unpicklable callable fails here, before any actor exists.
        cpu_plan, forwards = split_plan(plan) if sizing.gpu_devices else (plan, {})
        plan_bytes = dumps_worker_plan(plan, cpu_plan, self.finalize, self.writers)
        forwards_bytes = None
        if forwards:
            from ...gpu.model_cache import ModelSettings

            settings = ModelSettings.from_options(options)
            forwards_bytes = dumps_plan((forwards, options.autocast, options.forward_threads, settings), plan)
        self._sizing = sizing
        # Every actor at once: GPU workers (their models load in their constructors) and CPU
        # workers (bare, or warm from the last run), so that their processes start together.
        self._start_gpu_workers(sizing, forwards_bytes)
        warm = None
        if not self.gpu:  # a run with GPU workers neither takes nor keeps warm CPU actors
            self._pool_key = pool_key(ray, sizing.num_cpu_workers)
            warm = take_warm(self._pool_key)
        if warm is not None:
            self.cpu = [RunActor(handle, name, warm=True) for handle, name in zip(warm.handles, warm.names)]
            self.created.extend(self.cpu)
        else:
            self._num_cpu = sizing.num_cpu_workers
            self.cpu = [self._new_cpu_worker(index) for index in range(sizing.num_cpu_workers)]
        self._plan_ref = ray.put(plan_bytes)
        await_gpu_places(ray, self.gpu, self._asked)  # the CPU actors' processes start meanwhile
        window = REORDER_WINDOW_TASKS_PER_ACTOR * len(self.cpu) if self.deterministic else None
        self.dispatch = ActorDispatch(len(self.cpu), MAX_TASKS_IN_FLIGHT_PER_ACTOR, window, ready=False)
        for index in range(len(self.cpu)):
            self._begin_run(index)
        payloads = timed_payloads(iter_selected_payloads(plan), self.stats.main)
        if self.writers is not None:  # actors write whole parts: a dispatch unit is a part group
            payloads = self.writers.dispatch_units(payloads)
        self.payloads = payloads

    def _start_gpu_workers(self, sizing: ActorSizing, forwards_bytes: Optional[bytes]) -> None:
        if sizing.gpu_devices:
            self.gpu = start_gpu_actors(self.ray, self.token, sizing, forwards_bytes)
            self.created.extend(self.gpu)

    def _new_cpu_worker(self, index: int, generation: int = 0) -> RunActor:
        if self._nodes is None:  # once per run: the alive nodes' CPUs decide where its actors go
            self._nodes = spread_over_nodes(len(self.cpu) or self._num_cpu, alive_node_cpus(self.ray))
        # A replacement (its node may be the one lost) goes wherever Ray spreads it.
        node = self._nodes[index] if generation == 0 else None
        actor = start_cpu_actor(self.ray, self.token, index, generation, node)
        self.created.append(actor)
        return actor

    def _begin_run(self, index: int) -> None:
        """Sends CPU actor ``index`` the run's plan; it gets tasks once it answers (see :meth:`_started`)."""
        actor = self.cpu[index]
        cycle = get_dispatch_schedule(index, len(self.cpu), len(self.gpu)) if self.gpu else []
        ref = actor.handle.begin_run.remote(
            self._plan_ref, [g.handle for g in self.gpu], [g.place for g in self.gpu], cycle, self.max_task_retries > 0
        )
        self.starting[ref] = _Starting(index, actor.generation, time.monotonic())

    def _started(self, ref: Any) -> None:
        """CPU actor ``starting.worker`` answered ``begin_run``: it may get tasks, or the run fails."""
        ray = self.ray
        starting = self.starting.pop(ref)
        actor = self.cpu[starting.worker]
        assert self.dispatch is not None
        try:
            started: ActorStarted = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if actor.warm:  # died while idle between runs (no task of this run lost): start a fresh one
                self.cpu[starting.worker] = self._new_cpu_worker(starting.worker, actor.generation + 1)
                self._begin_run(starting.worker)
                return
            raise WorkerCrashedError(f"{actor.name}, a Ray actor of this run, died while starting: {first_line(exc)}") from None
        if started.error is not None:  # the plan did not load there: the user's error
            raise started.error
        actor.place = started.place
        if not self._first_ready:  # the driver's start-up: until the first actor can take a task
            self._first_ready = True
            self.stats.main.startup_seconds = time.perf_counter() - self._started_at
        self.dispatch.set_ready(starting.worker, True)

    def _check_start_deadline(self) -> None:
        if not self.starting:
            return
        oldest = min(starting.since for starting in self.starting.values())
        if time.monotonic() - oldest > ACTOR_START_TIMEOUT_S:
            raise PipelineShutdownError(
                f"the Ray actors of this run did not start within {ACTOR_START_TIMEOUT_S:g} s: the cluster may lack the "
                f"resources they ask for ({self._asked()}; ray.available_resources() = {self.ray.available_resources()})"
            )

    def _asked(self) -> str:
        sizing = self._sizing
        return f"{len(self.cpu)} CPU worker(s), {len(self.gpu)} GPU worker(s)" + (f", {sizing}" if sizing else "")

    # -- dispatch and collection --------------------------------------------------------------
    def _collect(self) -> Iterator[TaskOutput]:
        assert self.dispatch is not None
        dispatch, reorder = self.dispatch, self.reorder
        while True:
            for output in reorder.pop_ready():  # raises a task's error after the outputs before it
                self._records_out += output.count
                yield output
            if self.deterministic:
                dispatch.released = reorder.next_task
            self._submit_allowed()
            if not self.pending and not self.starting:
                for output in reorder.pop_ready():  # a source error just recorded raises here
                    self._records_out += output.count
                    yield output
                if dispatch.no_new_tasks and not dispatch.reruns_waiting:
                    return
                raise PipelineShutdownError("the Ray run has tasks left but none in flight (a bug of the dispatch)")
            if self.deterministic and reorder.buffered_tasks:  # outputs held behind an earlier task
                waited = time.perf_counter()
                self._wait_and_receive()
                self.stats.main.reorder_wait_seconds += time.perf_counter() - waited
            else:
                self._wait_and_receive()

    def _submit_allowed(self) -> None:
        """Submits every task the bounds allow now (reruns first); reads the source for new ones."""
        assert self.dispatch is not None and self.payloads is not None
        dispatch = self.dispatch
        while (rerun := dispatch.rerun_for()) is not None:
            target, flight = rerun
            self._submit(target, dataclasses.replace(flight, worker=target, generation=self.cpu[target].generation))
            dispatch.handed_out(target, new=False)
        while (worker := dispatch.worker_for_new_task()) is not None:
            index = dispatch.next_index
            try:
                key, payload = next(self.payloads)
            except StopIteration:
                dispatch.stop_after(index - 1)
                return
            except Exception as exc:  # the user's source raised: task ``index`` fails in its place
                add_context_note(exc, f"streamproc: raised while producing task {index} in the main process")
                self.reorder.add_error(index, exc)
                dispatch.stop_after(index - 1)  # task ``index`` was never handed out
                return
            task = Task(index, payload, self.run_id, None if key == index else key)
            self._submit(worker, _InFlight(worker, self.cpu[worker].generation, task))
            dispatch.handed_out(worker)

    def _submit(self, worker: int, flight: _InFlight) -> None:
        try:
            data = dumps_message(flight.task)
        except Exception as exc:
            raise SerializationError(f"task {flight.task.task_key} cannot be pickled to send it to a Ray actor: {exc}") from exc
        self.pending[self.cpu[worker].handle.run_task.remote(data)] = flight

    def _wait_and_receive(self) -> None:
        ray = self.ray
        refs = [*self.starting, *self.pending]
        ready, _ = ray.wait(refs, num_returns=1, timeout=RESULT_WAIT_TIMEOUT_S)
        if not ready:
            self._check_start_deadline()
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # every result ready now
        for ref in [r for r in ready if r in self.starting]:
            self._started(ref)
        for ref in sorted([r for r in ready if r in self.pending], key=lambda r: self.pending[r].task.index):
            flight = self.pending.pop(ref)
            assert self.dispatch is not None
            self.dispatch.finished(flight.worker)
            try:
                data = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self._actor_died(flight, exc)
                continue
            try:
                result: TaskResult = loads_message(data)
            except Exception as exc:
                raise SerializationError(
                    f"the result of task {flight.task.task_key} from {self.cpu[flight.worker].place} cannot be unpickled "
                    f"in the main process: {exc}"
                ) from exc
            for output in result.outputs:
                self.reorder.add(output)
            if result.error is not None:
                self.reorder.add_error(flight.task.index, result.error)
                self.dispatch.stop_after(flight.task.index)  # no task after a failed one is needed

    def _actor_died(self, flight: _InFlight, exc: BaseException) -> None:
        """CPU actor ``flight.worker`` died holding ``flight``: rerun it on a fresh actor, or raise."""
        assert self.dispatch is not None
        actor = self.cpu[flight.worker]
        place = actor.place if actor.generation == flight.generation else None
        if flight.attempt >= self.max_task_retries:
            where = place or f"ray cpu worker {flight.worker} (a replacement)"
            retried = f" after {flight.attempt} retries" if flight.attempt else ""
            same_actor = (flight.worker, flight.generation)
            queued = [f.task.task_key for f in self.pending.values() if (f.worker, f.generation) == same_actor]
            held = sorted([flight.task.task_key, *queued])
            raise WorkerCrashedError(
                f"{where} died holding task(s) {', '.join(map(str, held))}{retried} (one running, the others queued): "
                f"{first_line(exc)}"
            ) from None
        if actor.generation == flight.generation:  # the first of its tasks to report the death
            self.cpu[flight.worker] = self._new_cpu_worker(flight.worker, actor.generation + 1)
            self.dispatch.set_ready(flight.worker, False)
            self._begin_run(flight.worker)
        self.dispatch.rerun(dataclasses.replace(flight, attempt=flight.attempt + 1))

    def _end_run(self) -> None:
        """After the last output: the actors' part files and stats (success only)."""
        ray = self.ray
        ends: list[RunEnd] = ray.get([a.handle.end_run.remote() for a in self.cpu], timeout=RUN_END_TIMEOUT_S)
        for end in ends:
            self.stats.add_process(end.stats)
            if end.tasks is not None:
                self.stats.add_task(end.tasks)
        if self.writers is not None:
            written = sum(end.rows or 0 for end in ends)
            if written != self._records_out:
                raise PipelineShutdownError(
                    f"the Ray actors wrote {written} rows but produced {self._records_out} records: "
                    "some part files are incomplete"
                )
        for stats in ray.get([g.handle.stats.remote() for g in self.gpu], timeout=RUN_END_TIMEOUT_S):
            self.stats.add_process(stats)

    # -- shutdown -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kills every actor of this run and waits for them to go. Idempotent; see the NOTE above."""
        with self._shutdown_lock:
            if self._is_shut_down:
                return
            self._is_shut_down = True
        ray = self.ray
        self.pending.clear()
        self.starting.clear()
        self._plan_ref = None
        # A source holding resources (a limit's inner run, with its own actors) releases them now.
        close = getattr(self.payloads, "close", None)
        if close is not None:
            try:
                close()
            except ValueError:  # "generator already executing": garbage collection ran this inside it
                pass
        if not self.created or not ray.is_initialized():  # ray.shutdown() came first: the actors died with it
            return
        to_kill = self.created
        if self._completed and self._pool_key is not None:  # idle now: kept for the next run (see .actor_pool)
            keep_warm(self._pool_key, [a.handle for a in self.cpu], [a.name for a in self.cpu])
            kept = {id(a) for a in self.cpu}
            to_kill = [a for a in self.created if id(a) not in kept]
        kill_actors([actor.handle for actor in to_kill])
        if not to_kill:
            return
        wait_until_gone(ray, [actor.name for actor in to_kill])
