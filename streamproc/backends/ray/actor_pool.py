"""Warm CPU worker actors kept between runs on one cluster (main process).

Starting a Ray actor costs a fresh worker process and ``import streamproc`` there: 1 to 4 s
on a loaded 2-core machine, more than many whole runs take (issue 13). So the CPU worker
actors of a run that *completed* are kept, idle, for the next run on the same cluster with
the same number of CPU workers; every plan is loaded per run (``CPUWorker.begin_run``) and
dropped at its end, so nothing of a run stays in them.

What stays alive, and when it goes:

* at most one set of idle CPU worker actors per driver (:data:`_idle`), named
  ``streamproc-<token>-cpu-<i>``; they reserve no logical CPU or GPU (``num_cpus=0``, see
  :class:`~.cluster.ActorSizing`), so they hold no resource another job could use, only
  their processes' memory;
* they are killed when a run asks for another number of CPU workers (the option changed),
  when a run uses GPU workers (GPU worker actors are never kept: they hold a GPU), by
  :func:`release_warm_actors`, and at interpreter exit (``atexit``); ``ray.shutdown()`` ends
  them too (they are owned by this driver's job, and a job's actors die with it);
* a run that does not complete (a user error, a crash, an early break, Ctrl-C, garbage
  collection) kills every actor it used, warm ones included: they may still be running its
  tasks. See NOTE [ streamproc ray shutdown ] in :mod:`.run`.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class PoolKey:
    """What a warm set must match to serve a run: the cluster and this driver's job on it, and the size.

    Job ids restart at 1 on every cluster: the cluster's GCS address tells two clusters apart.
    """

    cluster: str
    job_id: str
    num_cpu_workers: int


@dataclass
class WarmActors:
    """Idle CPU worker actors: their handles and names, in worker order."""

    key: PoolKey
    handles: list[Any]
    names: list[str]


_lock = threading.Lock()
_idle: Optional[WarmActors] = None


def pool_key(ray: Any, num_cpu_workers: int) -> PoolKey:
    """The key of a run on the cluster this driver is connected to now (main process)."""
    context = ray.get_runtime_context()
    return PoolKey(context.gcs_address, context.get_job_id(), num_cpu_workers)


def take_warm(key: PoolKey) -> Optional[WarmActors]:
    """The idle set for ``key`` (removed from the pool), or None; an idle set of another key is killed."""
    global _idle
    with _lock:
        idle, _idle = _idle, None
    if idle is None:
        return None
    if idle.key == key:
        return idle
    if (idle.key.cluster, idle.key.job_id) == (key.cluster, key.job_id):  # the option changed: it will not serve again
        kill_actors(idle.handles)
    # Another job: this driver called ray.shutdown() since, and the actors died with their job.
    return None


def keep_warm(key: PoolKey, handles: Sequence[Any], names: Sequence[str]) -> None:
    """Keeps the actors of a completed run for the next one; the set kept before is killed."""
    global _idle
    with _lock:
        previous, _idle = _idle, WarmActors(key, list(handles), list(names))
    if previous is not None:
        kill_actors(previous.handles)


def warm_actor_names() -> list[str]:
    """The names of the idle actors kept now (for tests and docs)."""
    with _lock:
        return list(_idle.names) if _idle is not None else []


def release_warm_actors() -> int:
    """Kills the idle CPU worker actors kept between runs (main process); returns how many.

    Call it to hand their processes' memory back before the interpreter exits (which
    releases them too). Harmless when there are none, or when Ray was shut down already.
    """
    global _idle
    with _lock:
        idle, _idle = _idle, None
    if idle is None:
        return 0
    kill_actors(idle.handles)
    return len(idle.handles)


def kill_actors(handles: Sequence[Any]) -> None:
    """``ray.kill`` each of ``handles`` (no restart); quiet when one is dead or Ray is shut down."""
    import ray

    if not ray.is_initialized():  # ray.shutdown() came first: the actors died with the job
        return
    for handle in handles:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # already dead, or the driver is disconnecting
            pass


atexit.register(release_warm_actors)
