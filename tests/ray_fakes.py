"""Fakes of the Ray tests that run inside actors (no test here; light to import: no Ray)."""

from __future__ import annotations

import os
import signal
from typing import Any


def kill_in_forward(batch: Any) -> Any:
    """A ``forward`` that ends its own process (SIGKILL, as the OOM killer would): a GPU actor dying."""
    os.kill(os.getpid(), signal.SIGKILL)
    return batch


def tag_with_node(record: Any) -> Any:
    """A ``map`` fn: the record and the Ray node that ran it (the actor's node id)."""
    import ray

    return {"x": record, "node": ray.get_runtime_context().get_node_id()}


#: How long a task of :class:`TagWithNodeOnceAllStarted` waits for the other actors to start.
ALL_STARTED_TIMEOUT_S = 120.0
ALL_STARTED_POLL_S = 0.05


class TagWithNodeOnceAllStarted:
    """:func:`tag_with_node`, whose first record in each actor waits until ``actors`` actors ran one.

    The driver hands tasks to each actor as soon as it started, so with short tasks the first
    actor up may run them all before the next one starts; this barrier (a file per actor
    process in ``directory``, bounded by a deadline) makes every actor run some tasks, so
    that where the actors were placed, not start-up timing, decides which nodes ran tasks.
    """

    def __init__(self, directory: str, actors: int) -> None:
        self.directory = directory
        self.actors = actors
        self.waited = False

    def __call__(self, record: Any) -> Any:
        if not self.waited:
            import time

            self.waited = True
            open(os.path.join(self.directory, f"actor-{os.getpid()}"), "w").close()
            deadline = time.monotonic() + ALL_STARTED_TIMEOUT_S
            while len(os.listdir(self.directory)) < self.actors and time.monotonic() < deadline:
                time.sleep(ALL_STARTED_POLL_S)  # a barrier between processes: polled, bounded
        return tag_with_node(record)
