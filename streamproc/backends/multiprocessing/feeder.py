"""Feeder threads of the multiprocessing backend: one per CPU worker, over the shared dispatcher.

All of this runs in the main process. Each feeder thread asks the run's
:class:`~streamproc.execution.dispatch.TaskDispatcher` for the next numbered task and sends it
on its worker's task pipe, then ``Stop`` when the dispatcher has no more.

A feeder tells the dispatcher when it exits (``worker_gone``), however it exits, so that the
fairness rule (every idle worker gets a task before any gets a second one) never waits for a
worker nobody feeds any more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import SerializationError
from ...execution.dispatch import DispatchStopped, SourceFailed, TaskDispatcher
from ...execution.serialization import dumps_message
from .messages import WorkerId


def feed_worker(
    worker: WorkerId,
    dispatcher: TaskDispatcher,
    task_conn: Any,
    on_sent: Callable[[int, int], None],
    on_error: Callable[[int, BaseException], None],
    on_exit: Callable[[], None],
    first_message: bytes = b"",
    last_message: bytes = b"",
) -> None:
    """Body of feeder thread ``streamproc-feeder-<i>``: sends a run's tasks to one worker.

    Sends ``first_message`` (the run's ``StartRun``), the tasks, then ``last_message``
    (``EndRun``); empty messages are not sent. Errors go to the consumer through
    ``on_error(task_index, exc)``, never printed: a source error, or a task whose records
    cannot be pickled. A broken pipe means the worker died;
    the collector reports that from the worker's sentinel. ``on_exit`` wakes the collector,
    which then sees ``dispatcher.total_tasks``.

    The one feeder that is inside the user's source when the run stops cannot be interrupted:
    it stays until the source returns, then exits without sending anything and without
    ``on_exit`` (``DispatchStopped``): by then the run has shut down and closed the pipes.
    """
    abandoned = False
    try:
        if first_message:
            task_conn.send_bytes(first_message)
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
                data = dumps_message(task)
            except Exception as exc:
                dispatcher.fail_at(task.index)
                error = SerializationError(f"task {task.index} holds a record that cannot be pickled to send to {worker}: {exc}")
                error.__cause__ = exc
                on_error(task.index, error)
                break
            on_sent(worker.index, task.index)
            task_conn.send_bytes(data)
        # Whenever no task is left (next_task returns None at once then, even with tasks in
        # flight: the worker reads EndRun after them), and also when woken by stop(): a worker
        # without EndRun would never complete its part files. On a broken run the workers are
        # being terminated, so this send cannot block for long (EPIPE).
        if last_message:
            task_conn.send_bytes(last_message)
    except OSError:  # BrokenPipeError: the worker is gone; its sentinel tells the collector.
        pass
    finally:
        dispatcher.worker_gone(worker.index)
        if not abandoned:
            on_exit()
