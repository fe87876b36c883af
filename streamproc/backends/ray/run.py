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

The plan goes to the object store once; every CPU actor loads it once. A task's payload is a
descriptor for splittable sources (a parquet row group, a byte range), read by the actor from
a path every node sees; only an in-memory source's tasks carry their records.

NOTE [ streamproc ray shutdown ]
    Every exit path (the end, a user error, an actor crash, the consumer breaking out of the
    loop, ``close()``/garbage collection of the iterator, KeyboardInterrupt, which reaches
    the driver inside a bounded ``ray.wait``) goes through :meth:`_RayRun.shutdown`, which is
    idempotent (a lock and a flag). It closes the source's task generator (a ``limit``'s inner
    run stops its own actors there), kills every actor this run created (``ray.kill``, no
    restart: tasks still running are not needed), drops the plan's object, then waits up to
    ``SHUTDOWN_WAIT_S`` for the actors' names to leave the cluster, so that the next run finds
    their resources free. It never calls ``ray.shutdown()``: the cluster (the user's, or the
    local one streamproc started, which lives until the interpreter exits) stays as it was.
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
from .cluster import ActorSizing, size_actors
from .cpu import CPUWorker, RunEnd, TaskResult
from .dispatch import ActorDispatch
from .gpu import ActorPlace, GPUWorker

if TYPE_CHECKING:
    from ...io.sinks import Sink

#: Tasks submitted to one actor and not answered: one running, one queued in the actor.
MAX_TASKS_IN_FLIGHT_PER_ACTOR = 2
#: Deterministic runs: how many tasks past the oldest one not delivered may be handed out, per actor.
REORDER_WINDOW_TASKS_PER_ACTOR = 4
#: Upper bound of one wait for results: a KeyboardInterrupt is seen at least this often.
RESULT_WAIT_TIMEOUT_S = 1.0
#: How long the actors of a run may take to start (resources, plan and model load) before it fails.
ACTOR_START_TIMEOUT_S = 120.0
#: How long the end of a run waits for the actors' part files and stats.
RUN_END_TIMEOUT_S = 60.0
#: How long shutdown waits for the killed actors to leave the cluster, and how often it looks.
SHUTDOWN_WAIT_S = 10.0
SHUTDOWN_POLL_S = 0.05

_run_ids = itertools.count(1)


@dataclass
class _Actor:
    """One CPU or GPU worker actor of the run: its handle, name, place and generation."""

    handle: Any
    name: str
    place: Optional[ActorPlace] = None
    generation: int = 0


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
        self.cpu: list[_Actor] = []
        self.gpu: list[_Actor] = []
        self.created: list[_Actor] = []  # every actor started, replaced ones included
        self.pending: dict[Any, _InFlight] = {}
        self.reorder = ReorderBuffer(self.deterministic)
        self.dispatch: Optional[ActorDispatch[_InFlight]] = None
        self.payloads: Optional[Iterator[tuple[int, Any]]] = None
        self._plan_ref: Any = None
        self._cpu_remote: Any = None
        self._sizing: Optional[ActorSizing] = None
        self._records_out = 0
        self._shutdown_lock = threading.Lock()
        self._is_shut_down = False

    # -- lifecycle ----------------------------------------------------------------------------
    def outputs(self) -> Generator[TaskOutput, None, None]:
        try:
            started = time.perf_counter()
            self._start()  # serialize the plan, start the actors: the driver's start-up
            self.stats.main.startup_seconds = time.perf_counter() - started
            yield from self._collect()
            self._end_run()
        except BaseException:
            self.shutdown()
            raise
        self.shutdown()

    def _start(self) -> None:
        ray, plan, options = self.ray, self.plan, self.plan.options
        free, total = ray.available_resources(), ray.cluster_resources()
        sizing = size_actors(plan, float(free.get("CPU", 0)), float(total.get("GPU", 0)))
        # Serialize first: an unpicklable callable fails here, before any actor exists.
        cpu_plan, forwards = split_plan(plan) if sizing.gpu_devices else (plan, {})
        plan_bytes = dumps_worker_plan(plan, cpu_plan, self.finalize, self.writers)
        forwards_bytes = dumps_plan((forwards, options.autocast, options.forward_threads), plan) if forwards else None
        self._sizing = sizing
        self._start_gpu_workers(sizing, forwards_bytes)
        self._plan_ref = ray.put(plan_bytes)
        self._cpu_remote = ray.remote(CPUWorker)
        for index in range(sizing.num_cpu_workers):
            self.cpu.append(self._new_cpu_worker(index, sizing, 0))
        self._await_places(self.cpu)
        window = REORDER_WINDOW_TASKS_PER_ACTOR * len(self.cpu) if self.deterministic else None
        self.dispatch = ActorDispatch(len(self.cpu), MAX_TASKS_IN_FLIGHT_PER_ACTOR, window)
        payloads = timed_payloads(iter_selected_payloads(plan), self.stats.main)
        if self.writers is not None:  # actors write whole parts: a dispatch unit is a part group
            payloads = self.writers.dispatch_units(payloads)
        self.payloads = payloads

    def _start_gpu_workers(self, sizing: ActorSizing, forwards_bytes: Optional[bytes]) -> None:
        if not sizing.gpu_devices:
            return
        remote = self.ray.remote(GPUWorker)
        for index, device in enumerate(sizing.gpu_devices):
            name = f"{self.token}-gpu-{index}"
            handle = remote.options(name=name, num_cpus=0, num_gpus=sizing.gpus_per_gpu_worker, max_restarts=0).remote(
                index, device, forwards_bytes
            )
            actor = _Actor(handle, name)
            self.gpu.append(actor)
            self.created.append(actor)
        self._await_places(self.gpu)

    def _new_cpu_worker(self, index: int, sizing: ActorSizing, generation: int) -> _Actor:
        name = f"{self.token}-cpu-{index}" + (f"-r{generation}" if generation else "")
        cycle = get_dispatch_schedule(index, sizing.num_cpu_workers, len(self.gpu)) if self.gpu else []
        handle = self._cpu_remote.options(
            name=name, num_cpus=sizing.cpus_per_cpu_worker, max_restarts=0, scheduling_strategy="SPREAD"
        ).remote(index, self._plan_ref, [g.handle for g in self.gpu], [g.place for g in self.gpu], cycle)
        actor = _Actor(handle, name, generation=generation)
        self.created.append(actor)
        return actor

    def _await_places(self, actors: list[_Actor]) -> None:
        """Waits until ``actors`` are constructed (plan or models loaded); records where they run."""
        ray = self.ray
        refs = [actor.handle.place.remote() for actor in actors]
        try:
            places = ray.get(refs, timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise PipelineShutdownError(
                f"the Ray actors of this run did not start within {ACTOR_START_TIMEOUT_S:g} s: the cluster may lack the "
                f"resources they ask for ({self._asked()}; ray.available_resources() = {ray.available_resources()})"
            ) from None
        except ray.exceptions.RayActorError as exc:  # the process died while starting (a load error is data)
            raise WorkerCrashedError(f"a Ray actor of this run died while starting: {_first_line(exc)}") from None
        for actor, started in zip(actors, places):
            if started.error is not None:  # the constructor or the model load raised: the user's error
                raise started.error
            actor.place = started.place

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
            if not self.pending:
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
        refs = list(self.pending)
        ready, _ = ray.wait(refs, num_returns=1, timeout=RESULT_WAIT_TIMEOUT_S)
        if not ready:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # every result ready now
        for ref in sorted(ready, key=lambda r: self.pending[r].task.index):
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
                f"{_first_line(exc)}"
            ) from None
        if actor.generation == flight.generation:  # the first of its tasks to report the death
            assert self._sizing is not None
            replacement = self._new_cpu_worker(flight.worker, self._sizing, actor.generation + 1)
            self.cpu[flight.worker] = replacement
            self._await_places([replacement])
        self.dispatch.rerun(dataclasses.replace(flight, attempt=flight.attempt + 1))

    def _end_run(self) -> None:
        """After the last output: the actors' part files and stats (success only)."""
        ray = self.ray
        ends: list[RunEnd] = ray.get([a.handle.end_run.remote() for a in self.cpu], timeout=RUN_END_TIMEOUT_S)
        for end in ends:
            self.stats.add_process(end.stats)
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
        for actor in self.created:
            try:
                ray.kill(actor.handle, no_restart=True)
            except Exception:  # already dead, or the driver is disconnecting
                pass
        names = {actor.name for actor in self.created}
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        while time.monotonic() < deadline:
            try:
                alive = {entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)}
            except Exception:  # the driver is disconnecting: nothing more to wait for
                return
            if not names & alive:
                return
            time.sleep(SHUTDOWN_POLL_S)  # the GCS has no wait-for-death call: poll, bounded by the deadline


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
