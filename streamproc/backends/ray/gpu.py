"""GPU worker actors and the CPU actors' side of ``map_gpu`` (runs in Ray actors).

A :class:`GPUWorker` actor holds the models of every ``map_gpu`` stage on its device and runs
``forward`` only. A CPU worker actor's :class:`RayForwardRunner` sends each prepared batch to
the next GPU worker of its dispatch cycle (:func:`~streamproc.execution.schedule.get_dispatch_schedule`)
as an actor call: the batch travels CPU actor -> object store -> GPU actor and the outputs
back, never through the driver.

Bound: batches in flight from one CPU actor, per stage, <= ``MAX_BATCHES_IN_FLIGHT_PER_GPU``
x its cycle's length; the runner yields outputs in the order it sent the batches. Liveness: a
GPU actor that dies fails the calls waiting for it (Ray raises ``RayActorError``), which
becomes a :class:`~streamproc.errors.WorkerCrashedError` naming that GPU worker and its node.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ...errors import ExceptionWithTraceback, WorkerCrashedError
from ...execution.serialization import dill_loads
from ...stats import ProcessStats
from ..multiprocessing.messages import WorkerId
from ..multiprocessing.worker_runtime import as_crash
from ..multiprocessing.worker_stats import WorkerClock

#: Batches of one stage in flight per GPU worker of a CPU actor's cycle: one computing, one waiting.
MAX_BATCHES_IN_FLIGHT_PER_GPU = 2


@dataclass(frozen=True)
class ActorPlace:
    """Where an actor runs, for error messages: ``"ray gpu worker 0 (pid 123, node 10.0.0.2 1a2b3c4d)"``."""

    name: str
    node_ip: str
    node_id: str
    pid: int

    def __str__(self) -> str:
        return f"{self.name} (actor pid {self.pid}, node {self.node_ip} {self.node_id[:8]})"


def actor_place(name: str) -> ActorPlace:
    """This actor's :class:`ActorPlace` (runs in the actor)."""
    import os

    import ray

    context = ray.get_runtime_context()
    return ActorPlace(name, ray.util.get_node_ip_address(), context.get_node_id(), os.getpid())


@dataclass(frozen=True)
class ActorStarted:
    """An actor's answer to its first call: where it runs, or why it could not load (a carrier)."""

    place: ActorPlace
    #: An ExceptionWithTraceback where it is made; unpickled, the exception it carries.
    error: Any = None


@dataclass(frozen=True)
class ForwardAnswer:
    """A GPU worker's answer to one batch: the outputs on the host, or forward's error (a carrier)."""

    outputs: Any = None
    #: An ExceptionWithTraceback where it is made; unpickled, the user's exception it carries.
    error: Any = None


class GPUWorker:
    """Ray actor ``streamproc-<token>-gpu-<index>``: ``forward`` of every ``map_gpu`` stage of one run.

    Protocol: constructed with the dill bytes of ``(forwards, autocast, torch_threads,
    model settings)`` (see :func:`~streamproc.execution.split.split_plan`; Ray hands the
    object store's bytes), it moves the models to its device in its constructor, which Ray
    runs before any call, from the driver or from a CPU worker actor; :meth:`place` (the
    driver's first call) says where it runs, or why it could not load them. Then each
    :meth:`forward` call computes one batch, answering a :class:`ForwardAnswer`; :meth:`stats`
    at the end of the run. GPU worker actors serve one run (they hold a GPU: never kept warm).
    """

    def __init__(self, index: int, device: Optional[str], forwards_bytes: bytes) -> None:
        self.name = f"ray gpu worker {index}"
        self.clock = WorkerClock(str(WorkerId("gpu", index)), "gpu")  # the name stats know it by
        self.runners: dict[int, Any] = {}
        self.load_error: Any = None
        self.cache: Any = None
        self.index = index
        self.device = device
        try:
            self._load(dill_loads(forwards_bytes))
        except BaseException as exc:  # reported by place(): an actor whose constructor raises only says it died
            crash = as_crash(exc, WorkerId("gpu", index), "while loading its models")
            self.load_error = ExceptionWithTraceback(crash, f"{self.name}, at start-up")
        self.clock.loaded()
        self._last_answer = time.perf_counter()

    def _load(self, loaded: tuple[Any, ...]) -> None:
        from ...execution.worker_info import WorkerInfo, set_process_info
        from ...gpu import DeviceForward, ModelCache
        from ...gpu.placement import first_device

        stages, autocast, torch_threads, settings = loaded
        self.cache = ModelCache(first_device(self.device) if self.device else None, settings)
        self.runners = {
            index: DeviceForward(
                stage.forward, self.device, autocast, stage.name, stage.batch_size, torch_threads, stage.place, self.cache
            )
            for index, stage in stages.items()
        }
        for runner in self.runners.values():  # stage order: each moves its models while they fit a budget
            runner.start()
        device = str(next(iter(self.runners.values())).device)
        set_process_info(WorkerInfo("gpu", self.index, 0, device, None))  # sp.get_worker_info() in forward

    def place(self) -> ActorStarted:
        """Where this actor runs, or why it cannot load the models."""
        return ActorStarted(actor_place(self.name), self.load_error)

    def forward(self, stage: int, batch: Any) -> ForwardAnswer:
        """``forward`` of stage ``stage`` on ``batch``: the outputs on the host, or its error."""
        if self.load_error is not None:  # the driver raises it too, from place()
            return ForwardAnswer(error=self.load_error)
        now = time.perf_counter()
        self.clock.stats.idle_seconds += now - self._last_answer
        runner = self.runners[stage]
        try:
            return ForwardAnswer(outputs=runner.compute(runner.upload(batch)))
        except Exception as exc:
            return ForwardAnswer(error=ExceptionWithTraceback(exc, f"{self.name} ({runner.device}), {runner.stage}"))
        finally:
            self._last_answer = time.perf_counter()

    def stats(self) -> ProcessStats:
        """This worker's figures for the run (its wall time up to now)."""
        stats = self.clock.run_stats()
        for runner in self.runners.values():
            stats.h2d_seconds += runner.h2d_seconds
            stats.forward_seconds += runner.forward_seconds
            stats.d2h_seconds += runner.d2h_seconds
            stats.batches += runner.batches
        if self.cache is not None:
            stats.swaps += self.cache.swaps
            stats.swap_seconds += self.cache.swap_seconds
        stats.busy_seconds = stats.h2d_seconds + stats.forward_seconds + stats.d2h_seconds
        return stats


class RayForwardRunner:
    """Forward runner of stage ``stage`` in a CPU actor: forward runs on GPU worker actors.

    ``gpus`` are the run's GPU worker handles, ``places`` where they run (for errors),
    ``cycle`` the indices this CPU actor sends to, in order.
    """

    #: Where forward runs, for the run's stats (``StageStats.forward_where``).
    location = "GPU workers"

    def __init__(self, gpus: Sequence[Any], places: Sequence[ActorPlace], cycle: Sequence[int], stage: int) -> None:
        self.gpus = gpus
        self.places = places
        self.stage = stage
        self.max_pending = MAX_BATCHES_IN_FLIGHT_PER_GPU * len(cycle)
        self._next_gpu = itertools.cycle(cycle)

    def run(self, batches: Iterator[tuple[list[Any], Any]]) -> Iterator[tuple[list[Any], Any]]:
        pending: collections.deque[tuple[list[Any], int, Any]] = collections.deque()
        for records, batch in batches:
            if len(pending) >= self.max_pending:
                done_records, gpu, ref = pending.popleft()
                yield done_records, self._outputs(gpu, ref)
            gpu = next(self._next_gpu)
            pending.append((records, gpu, self.gpus[gpu].forward.remote(self.stage, batch)))
        while pending:
            done_records, gpu, ref = pending.popleft()
            yield done_records, self._outputs(gpu, ref)
        # Refs left in ``pending`` by an error are dropped: Ray discards answers nobody holds.

    def _outputs(self, gpu: int, ref: Any) -> Any:
        import ray

        try:
            answer: ForwardAnswer = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise WorkerCrashedError(f"{self.places[gpu]} died before answering a batch of stage {self.stage}: {exc}") from None
        if answer.error is not None:
            raise answer.error
        return answer.outputs
