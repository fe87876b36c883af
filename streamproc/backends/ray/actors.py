"""The actors of one Ray run: their handles and names, creating them, waiting for them (main process).

Every actor streamproc starts is named ``streamproc-<token>-cpu-<i>`` (``-r<generation>`` for
a replacement) or ``streamproc-<token>-gpu-<j>``, ``<token>`` unique on the cluster, so that
shutdown (and the tests) can tell when they are gone. See NOTE [ streamproc ray shutdown ] in
:mod:`.run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ...errors import PipelineShutdownError, WorkerCrashedError
from .gpu import ActorPlace

#: How long the actors of a run may take to start (resources, plan and model load) before it fails.
ACTOR_START_TIMEOUT_S = 120.0
#: How long shutdown waits for the killed actors to leave the cluster, and how often it looks.
SHUTDOWN_WAIT_S = 10.0
SHUTDOWN_POLL_S = 0.05

#: ``ray.remote(cls)`` per job (a new job after ``ray.shutdown()``/``ray.init()``): made once, not per run.
_remote_classes: dict[tuple[str, str, type], Any] = {}


def remote_class(ray: Any, cls: type) -> Any:
    """``ray.remote(cls)``, made once per job."""
    context = ray.get_runtime_context()
    key = (context.gcs_address, context.get_job_id(), cls)
    remote = _remote_classes.get(key)
    if remote is None:
        remote = _remote_classes[key] = ray.remote(cls)
    return remote


@dataclass
class RunActor:
    """One CPU or GPU worker actor of the run: its handle, name, place and generation.

    ``warm``: taken from the pool of a previous run (its process may have died since).
    """

    handle: Any
    name: str
    place: Optional[ActorPlace] = None
    generation: int = 0
    warm: bool = False


def await_gpu_places(ray: Any, actors: list[RunActor], asked: Callable[[], str]) -> None:
    """Waits until the GPU worker ``actors`` are constructed (models loaded); records where they run."""
    if not actors:
        return
    refs = [actor.handle.place.remote() for actor in actors]
    try:
        places = ray.get(refs, timeout=ACTOR_START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise PipelineShutdownError(
            f"the Ray actors of this run did not start within {ACTOR_START_TIMEOUT_S:g} s: the cluster may lack the "
            f"resources they ask for ({asked()}; ray.available_resources() = {ray.available_resources()})"
        ) from None
    except ray.exceptions.RayActorError as exc:  # the process died while starting (a load error is data)
        raise WorkerCrashedError(f"a Ray actor of this run died while starting: {first_line(exc)}") from None
    for actor, started in zip(actors, places):
        if started.error is not None:  # the constructor or the model load raised: the user's error
            raise started.error
        actor.place = started.place


def wait_until_gone(ray: Any, names: Sequence[str]) -> None:
    """Waits up to ``SHUTDOWN_WAIT_S`` until no actor named in ``names`` is alive (main process)."""
    if not names:
        return
    wanted = set(names)
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    while time.monotonic() < deadline:
        try:
            alive = {entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)}
        except Exception:  # the driver is disconnecting: nothing more to wait for
            return
        if not wanted & alive:
            return
        time.sleep(SHUTDOWN_POLL_S)  # the GCS has no wait-for-death call: poll, bounded by the deadline


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
