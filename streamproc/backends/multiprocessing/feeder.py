"""Feeder threads of the multiprocessing backend: one per CPU worker, over the shared dispatcher.

All of this runs in the main process. Each feeder thread asks the run's
:class:`~streamproc.execution.dispatch.TaskDispatcher` for the next numbered task and sends it
through its worker's :class:`WorkerSlot`, then ``EndRun`` when the dispatcher has no more.

A feeder tells the dispatcher when it exits (``worker_gone``), however it exits, so that the
fairness rule (every idle worker gets a task before any gets a second one) never waits for a
worker nobody feeds any more.

Retries (``max_task_retries``, see :mod:`.retries`): the slot outlives the worker process. The
collector swaps a dead worker's process for a fresh one in the slot (under the slot's lock) and
requeues the tasks it held; the feeder, which saw a broken pipe or nothing at all, goes on
asking the dispatcher, and the slot sends ``StartRun`` to the new process before its first task.
"""

from __future__ import annotations

import collections
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, Optional

from ...errors import SerializationError
from ...execution.dispatch import DispatchStopped, SourceFailed, TaskDispatcher
from ...execution.serialization import dumps_message
from ...execution.task import Task
from .messages import WorkerId
from .pool import SHUTDOWN_JOIN_TIMEOUT_S

#: How long shutdown waits for the feeder blocked inside the user's source to come out.
SOURCE_RETURN_GRACE_S = 1.0


class WorkerSlot:
    """The run's side of CPU worker index ``i``: the task pipe of its current process, and the
    tasks sent there and not finished (main process; the feeder and the collector share it).

    ``tasks`` and ``generation`` change only under ``lock``: the feeder records a task and sends
    it under the lock, the collector swaps a dead process for its replacement under it, so a
    task is either recorded for the dead process (and requeued) or sent to the new one.

    Args:
        task_conn: the worker's task pipe (write end).
        first_message / last_message: the run's ``StartRun`` / ``EndRun`` bytes (empty: not sent).
        encode: the bytes of a task (an isolated task is sent as ``IsolatedTask``).
        survives_worker_death: whether the run replaces a dead worker (retries enabled).
        keeps_payloads: whether ``tasks`` keep each task's payload once it is sent (a dead
            worker's tasks are sent again; a stuck task's error locates its record). Without,
            ``tasks`` holds each task without its payload, so the main process does not hold
            the records of every task in flight after pickling them (1 MiB per task of big
            records: issue 10, memory row).
    """

    def __init__(
        self,
        task_conn: Any,
        first_message: bytes,
        last_message: bytes,
        encode: Callable[[Task], bytes] = dumps_message,
        survives_worker_death: bool = False,
        keeps_payloads: bool = True,
    ) -> None:
        self.lock = threading.Lock()
        self.keeps_payloads = keeps_payloads
        self.task_conn = task_conn
        self.first_message = first_message
        self.last_message = last_message
        self.encode = encode
        self.survives_worker_death = survives_worker_death
        #: Tasks sent to the current process and not finished, oldest (the running one) first.
        self.tasks: collections.OrderedDict[int, Task] = collections.OrderedDict()
        self.generation = 0
        self._started_generation = -1

    def send_task(self, task: Task, data: bytes) -> None:
        """Records ``task`` as held by the current process, then sends it (``StartRun`` first to a new process).

        Raises:
            OSError: the process is gone (the task stays recorded: the collector requeues it).
        """
        held = task if self.keeps_payloads else Task(task.index, None, task.run_id, task.key)
        with self.lock:
            self.tasks[task.index] = held
            self._send_start()
            self.task_conn.send_bytes(data)

    def send_end(self) -> None:
        with self.lock:
            self._send_start()
            if self.last_message:
                self.task_conn.send_bytes(self.last_message)

    def _send_start(self) -> None:
        if self._started_generation != self.generation:
            self._started_generation = self.generation
            if self.first_message:
                self.task_conn.send_bytes(self.first_message)

    def finished(self, task_index: int) -> bool:
        """Task ``task_index`` is finished; False if the current process did not hold it."""
        with self.lock:
            return self.tasks.pop(task_index, None) is not None

    def replace(self, task_conn: Any) -> list[Task]:
        """The process died: the new one's pipe is ``task_conn``; returns the tasks the dead one held."""
        with self.lock:
            held = list(self.tasks.values())
            self.tasks.clear()
            self.task_conn = task_conn
            self.generation += 1
            return held


def feed_worker(
    worker: WorkerId,
    dispatcher: TaskDispatcher,
    slot: WorkerSlot,
    on_error: Callable[[int, BaseException], None],
    on_exit: Callable[[], None],
) -> None:
    """Body of feeder thread ``streamproc-feeder-<i>``: sends a run's tasks to one worker.

    Sends the run's ``StartRun``, the tasks, then ``EndRun`` (see :class:`WorkerSlot`). Errors
    go to the consumer through ``on_error(task_index, exc)``, never printed: a source error, or
    a task whose records cannot be pickled. A broken pipe means the worker died; the collector
    reports that from the worker's sentinel, or (``slot.survives_worker_death``) replaces the
    worker, and this thread goes on. ``on_exit`` wakes the collector, which then sees
    ``dispatcher.total_tasks``.

    The one feeder that is inside the user's source when the run stops cannot be interrupted:
    it stays until the source returns, then exits without sending anything and without
    ``on_exit`` (``DispatchStopped``): by then the run has shut down and closed the pipes.
    """
    abandoned = False
    try:
        while True:
            try:
                task = dispatcher.next_task(worker.index)
            except DispatchStopped:
                abandoned = True
                return
            except SourceFailed as failure:
                on_error(failure.index, failure.error)
                break
            if task is None:
                break
            try:
                data = slot.encode(task)
            except Exception as exc:
                dispatcher.fail_at(task.index)
                error = SerializationError(f"task {task.index} holds a record that cannot be pickled to send to {worker}: {exc}")
                error.__cause__ = exc
                on_error(task.index, error)
                break
            try:
                slot.send_task(task, data)
            except OSError:
                if not slot.survives_worker_death:
                    raise
                # The worker died: the collector replaces it and requeues this task (recorded).
        # Whenever no task is left (next_task returns None at once then, even with tasks in
        # flight: the worker reads EndRun after them), and also when woken by stop(): a worker
        # without EndRun would never complete its part files. On a broken run the workers are
        # being terminated, so this send cannot block for long (EPIPE).
        slot.send_end()
    except OSError:  # BrokenPipeError: the worker is gone; its sentinel tells the collector.
        pass
    finally:
        dispatcher.worker_gone(worker.index)
        if not abandoned:
            on_exit()


def join_feeders(feeders: list[Optional[threading.Thread]], reader: Optional[int], source: str) -> bool:
    """Joins a run's feeders against one deadline (main process); True if one is left blocked.

    After ``dispatcher.stop()`` every feeder returns at once but the one inside the user's
    ``next()`` (index ``reader``, reading the source ``source`` describes), which nothing can
    interrupt: it gets ``SOURCE_RETURN_GRACE_S``, then a warning, and exits sending nothing when
    the source returns (``DispatchStopped``).
    """
    deadline = time.monotonic() + SHUTDOWN_JOIN_TIMEOUT_S
    for index, feeder in enumerate(feeders):
        if feeder is not None and index != reader:
            feeder.join(max(0.0, deadline - time.monotonic()))
    blocked = feeders[reader] if reader is not None else None
    if blocked is None:
        return False
    blocked.join(max(0.0, min(SOURCE_RETURN_GRACE_S, deadline - time.monotonic())))
    if not blocked.is_alive():
        return False
    warnings.warn(
        f"streamproc: the source {source} is still blocked in next() "
        f"(thread {blocked.name}); the thread exits, sending nothing, when the source returns",
        RuntimeWarning,
        stacklevel=3,
    )
    return True
