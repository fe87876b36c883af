"""The end of a run on a warm pool: drain the workers instead of stopping them (main process).

A run on its own processes ends by stopping them (terminating them first when it broke: see
NOTE [ streamproc shutdown ] in :mod:`streamproc.backends.multiprocessing.run`). On a
:class:`~streamproc.service.pool.WorkerPool` the processes must go on serving, so
:func:`drain_run` brings them back to the pool's invariant instead:

* the dispatcher is stopped (done by the run), so every feeder sends its worker ``EndRun``
  after the tasks it already sent (at most ``MAX_TASKS_IN_FLIGHT_PER_WORKER``);
* meanwhile the results are read and dropped (a worker blocked sending results must not keep
  its feeder blocked), until each live CPU worker answers ``RunEnded``, which carries its stats;
* a worker that has not answered after ``DRAIN_TIMEOUT_S`` (a task that does not end), or
  whose feeder is stuck in the user's source past ``SOURCE_RETURN_GRACE_S``, is killed;
  a broken run whose workers write part files has them killed at once (a part of a failed run
  must not be completed);
* dead CPU workers are replaced; a dead GPU worker asks for a restart of the pool.

A run that shares the workers with other runs (:func:`drain_shared_run`) ends the same way
but for itself only: the workers go on with the other runs' tasks, the router reads their
pipes, and what this run needs (its ``RunEnded`` answers) comes through its inbox. Its
tasks still queued in the workers' pipes run to their end (at most
``MAX_TASKS_IN_FLIGHT_PER_WORKER`` per worker) and their outputs are dropped by the router;
a worker that has not answered after ``DRAIN_TIMEOUT_S`` is killed (the router replaces it,
and a run with a task on it fails).
"""

from __future__ import annotations

import multiprocessing.connection
import time
import warnings
from typing import TYPE_CHECKING, Any

from ..backends.multiprocessing.feeder import SOURCE_RETURN_GRACE_S
from ..backends.multiprocessing.lease import RunInbox, WorkerExited, worker_exited
from ..backends.multiprocessing.log_forwarding import reemit
from ..backends.multiprocessing.messages import LogRecordMessage, RunEnded, WorkerFailed, WorkerStarted
from ..backends.multiprocessing.pool import KILL_JOIN_TIMEOUT_S, WorkerHandle
from ..execution.serialization import loads_message

if TYPE_CHECKING:
    from ..backends.multiprocessing.run import _Run

#: How long a broken run's workers may take to finish the tasks they hold before they are killed.
DRAIN_TIMEOUT_S = 30.0
#: Upper bound of one wait while draining (feeders and the source are checked between waits).
DRAIN_WAIT_S = 0.1


def drain_run(run: _Run, broken: bool) -> bool:
    """Brings ``run``'s pool back to the warm pool's invariant; True if the pool must restart.

    Runs in the main process, in :meth:`_Run.shutdown` (the dispatcher already stopped).
    """
    pool = run.pool
    if broken and run.writers is not None:
        for worker in pool.cpu_workers:
            if not worker.exited:
                worker.process.kill()
    pending = {
        worker.id.index: worker
        for worker in pool.cpu_workers
        if not worker.exited and run.assigned[worker.id.index].ended is None
    }
    started = time.monotonic()
    restart = False
    while pending and time.monotonic() - started < DRAIN_TIMEOUT_S:
        _kill_worker_of_blocked_feeder(run, pending, time.monotonic() - started)
        gpu_live = [w for w in pool.gpu_workers if not w.exited]
        by_conn = {w.result_conn: w for w in [*pending.values(), *gpu_live]}
        by_sentinel = {w.process.sentinel: w for w in [*pending.values(), *gpu_live]}
        for ready in multiprocessing.connection.wait([*by_conn, *by_sentinel], timeout=DRAIN_WAIT_S):
            worker = by_conn.get(ready) or by_sentinel[ready]
            if ready in by_conn and _read_messages(run, worker):
                continue
            # Its pipe ended or its process did: reap it.
            worker.process.join(KILL_JOIN_TIMEOUT_S)
            if worker.process.exitcode is None:
                continue  # a closed pipe of a live process: its sentinel or the deadline settles it
            pool.reap(worker)
            if worker.id.kind == "gpu":
                restart = True
            pending.pop(worker.id.index, None)
            if worker.id.kind == "cpu" and run.assigned[worker.id.index].ended is not None:
                pending.pop(worker.id.index, None)
        pending = {i: w for i, w in pending.items() if run.assigned[i].ended is None and not w.exited}
    for worker in pending.values():  # past the deadline: killed, replaced below
        worker.process.kill()
        pool.reap(worker)
    _join_feeders(run)
    if restart:
        return True
    for worker in list(pool.cpu_workers):
        if worker.exited:
            try:
                pool.replace_cpu_worker(worker.id.index, also_close=_run_pipes(run))
            except Exception:
                return True  # a GPU worker is gone: the pool restarts
    return False


def drain_shared_run(run: _Run, inbox: RunInbox) -> None:
    """Waits until every CPU worker is done with ``run`` (main process, the run's thread).

    Runs in :meth:`_Run.shutdown` (the dispatcher already stopped, so each feeder sends
    ``EndRun`` after the tasks it sent). The feeder inside the user's source sends nothing:
    past ``SOURCE_RETURN_GRACE_S`` its ``EndRun`` is sent from here (it exits, sending nothing,
    when the source returns).
    """
    started = time.monotonic()
    ended_for_feeder = False
    while time.monotonic() - started < DRAIN_TIMEOUT_S:
        # A worker without a slot was sent nothing (the run failed before its feeders started).
        pending = [i for i, a in enumerate(run.assigned) if a.ended is None and a.slot is not None]
        if not pending:
            break
        if not ended_for_feeder and time.monotonic() - started >= SOURCE_RETURN_GRACE_S:
            ended_for_feeder = _end_for_blocked_feeder(run)
        if multiprocessing.connection.wait([run._wakeup_reader], timeout=DRAIN_WAIT_S):
            while run._wakeup_reader.poll():
                run._wakeup_reader.recv_bytes()
        for worker, item in inbox.take():
            if isinstance(item, RunEnded) and worker.id.kind == "cpu":
                run.assigned[worker.id.index].ended = item
                run._add_worker_stats(item)
            elif isinstance(item, WorkerFailed) and item.run_id == run.run_id and worker.id.kind == "cpu":
                run.assigned[worker.id.index].ended = RunEnded(run.run_id, worker.id, [], None)
            elif isinstance(item, WorkerExited) and worker.id.kind == "cpu":
                try:
                    worker_exited(run, worker, item)
                except Exception:  # it held a task of this run: nothing of the run is left there
                    run.assigned[worker.id.index].ended = RunEnded(run.run_id, worker.id, [], None)
    else:
        for index, assignment in enumerate(run.assigned):  # past the deadline: killed, the router replaces them
            if assignment.ended is None and assignment.slot is not None:
                run.pool.cpu_workers[index].process.kill()
    _join_feeders(run)


def _end_for_blocked_feeder(run: _Run) -> bool:
    """Sends ``EndRun`` for the feeder blocked in the user's source; True once nothing is left to do."""
    reader = run.dispatcher.reader if run.dispatcher is not None else None
    if reader is None:
        return False
    assignment = run.assigned[reader]
    if assignment.feeder is None or not assignment.feeder.is_alive() or assignment.slot is None:
        return True
    warnings.warn(
        f"streamproc: the source {run.plan.source.describe()} is still blocked in next() (thread "
        f"{assignment.feeder.name}); the thread exits, sending nothing, when the source returns",
        RuntimeWarning,
        stacklevel=3,
    )
    try:
        assignment.slot.send_end()
    except OSError:  # the worker is gone: its exit ends the run there
        pass
    return True


def _read_messages(run: _Run, worker: WorkerHandle) -> bool:
    """Reads what ``worker`` sent; keeps its run report, log records and start; False at end of pipe."""
    conn = worker.result_conn
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return False
        try:
            message = loads_message(data)
        except Exception:  # a result nobody will read, that does not even unpickle
            message = None
        if isinstance(message, RunEnded) and message.run_id == run.run_id and worker.id.kind == "cpu":
            run.assigned[worker.id.index].ended = message
            if message.stats is not None:
                run.stats.add_process(message.stats)
        elif isinstance(message, WorkerFailed) and worker.id.kind == "cpu":
            # It could not complete its part files: its run is over all the same.
            run.assigned[worker.id.index].ended = RunEnded(run.run_id, worker.id, [], None)
        elif isinstance(message, LogRecordMessage):
            reemit(message)
        elif isinstance(message, WorkerStarted):
            worker.started = True
        # Anything else (outputs, task failures of the broken run) is no longer needed.
        if not conn.poll():
            return True


def _kill_worker_of_blocked_feeder(run: _Run, pending: dict[int, WorkerHandle], elapsed: float) -> None:
    """The feeder inside the user's source cannot send ``EndRun``: past the grace, its worker is killed."""
    reader = run.dispatcher.reader if run.dispatcher is not None else None
    if reader is None or reader not in pending or elapsed < SOURCE_RETURN_GRACE_S:
        return
    feeder = run.assigned[reader].feeder
    if feeder is None or not feeder.is_alive():
        return
    warnings.warn(
        f"streamproc: the source {run.plan.source.describe()} is still blocked in next() (thread {feeder.name}); "
        f"the pool replaces cpu worker {reader}, and the thread exits, sending nothing, when the source returns",
        RuntimeWarning,
        stacklevel=2,
    )
    worker = pending.pop(reader)
    worker.process.kill()
    run.pool.reap(worker)


def _join_feeders(run: _Run) -> None:
    """Joins the run's feeders (each sent ``EndRun`` or found its worker gone; one may be in the source)."""
    deadline = time.monotonic() + SOURCE_RETURN_GRACE_S
    for assignment in run.assigned:
        if assignment.feeder is not None:
            assignment.feeder.join(max(0.0, deadline - time.monotonic()))


def _run_pipes(run: _Run) -> tuple[Any, ...]:
    """The run's own descriptors, which a forked replacement must close."""
    return tuple(conn for conn in (run._wakeup_reader, run._wakeup_writer) if conn is not None)
