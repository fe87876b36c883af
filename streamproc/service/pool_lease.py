"""A run's hold on a :class:`~streamproc.service.pool.WorkerPool` (main process, the run's thread).

:class:`PoolLease` is the pool's side of the
:class:`~streamproc.backends.multiprocessing.lease.RunLease` contract: it has the run admitted
(shared or alone, see :mod:`.pool`), sends the GPU workers the run's forwards, makes the run's
side of each task pipe, and at the end drains the run (:mod:`.drain`) and frees its place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ..backends.multiprocessing.feeder import WorkerSlot
    from ..backends.multiprocessing.lease import RunInbox
    from ..backends.multiprocessing.pool import WorkerHandle
    from ..backends.multiprocessing.run import _Run
    from ..execution.task import Task
    from ..gpu.model_cache import ModelSettings
    from .pool import WorkerPool


class PoolLease:
    """One run's hold on a :class:`WorkerPool` (main process). See :class:`RunLease`."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._held = False
        self.run_id = -1
        self.thread = threading.get_ident()
        #: Whether the run has the workers alone (see the module docstring).
        self.exclusive = True
        self.uses_gpu = False
        self.settings: Optional[ModelSettings] = None
        #: What the router hands the run (shared runs; None: the run reads the pipes itself).
        self.inbox: Optional[RunInbox] = None
        #: A CPU worker handle, to address what ``close()`` tells an open shared run.
        self.worker: Optional[WorkerHandle] = None
        self._replaces_workers = False

    def begin(self, run: _Run, forwards_bytes: Optional[bytes]) -> None:
        from ..backends.multiprocessing.lease import RunInbox
        from ..gpu.model_cache import ModelSettings

        self.run_id = run.run_id
        self.thread = threading.get_ident()
        self._replaces_workers = run.replaces_workers
        self.exclusive = run.writers is not None or run.replaces_workers
        self.uses_gpu = forwards_bytes is not None and bool(self.pool.gpu_worker_devices)
        self.settings = ModelSettings.from_options(run.plan.options)
        if not self.exclusive:
            self.inbox = RunInbox(run._wake)
        processes = self.pool._admit(self)
        self._held = True
        run.pool = processes
        self.worker = processes.cpu_workers[0]
        router = self.pool._router
        if self.inbox is not None and router is not None:
            router.add(run.run_id, self.inbox, lambda: _run_pipes(run))
        if forwards_bytes is not None and processes.gpu_workers:
            with self.pool._control_lock:
                processes.begin_gpu_run(run.run_id, forwards_bytes)

    def slot(self, worker: WorkerHandle, first: bytes, last: bytes, encode: Callable[[Task], bytes]) -> WorkerSlot:
        from ..backends.multiprocessing.feeder import WorkerSlot
        from ..backends.multiprocessing.lease import SharedConn, SharedWorkerSlot

        if self.inbox is None:
            return WorkerSlot(worker.task_conn, first, last, encode, self._replaces_workers)
        conn = SharedConn(worker.task_conn, self.pool._send_locks[worker.id.index])
        return SharedWorkerSlot(conn, first, last, encode)

    def end(self, run: _Run, broken: bool) -> None:
        if not self._held:  # the run failed before its turn (serialization, a closed pool)
            return
        self._held = False
        from .drain import drain_run, drain_shared_run

        try:
            if self.inbox is not None:
                if not self.pool._closed:
                    drain_shared_run(run, self.inbox)
                self._end_gpu_run(run)
                return
            needs_restart = drain_run(run, broken)
            if needs_restart and not self.pool._closed:
                self.pool._processes.restart()
            else:
                self._end_gpu_run(run)
        except BaseException:
            if not self.pool._closed and self.inbox is None:
                self.pool._processes.restart()  # whatever broke, the next run gets fresh processes
            raise
        finally:
            router = self.pool._router
            if router is not None:
                router.remove(run.run_id)
            self.pool._release(self)

    def _end_gpu_run(self, run: _Run) -> None:
        """Tells the GPU workers that run ``run`` is over (they drop its forwards, keep its models)."""
        if not self.uses_gpu or self.pool._closed:
            return
        from ..backends.multiprocessing.messages import EndGPURun
        from ..execution.serialization import dumps_message

        data = dumps_message(EndGPURun(run.run_id))
        with self.pool._control_lock:
            for handle in run.pool.gpu_workers:
                if handle.exited or handle.task_conn is None:
                    continue
                try:
                    handle.task_conn.send_bytes(data)
                except OSError:  # it is gone: the next run's start sees it
                    pass


def _run_pipes(run: _Run) -> tuple[object, ...]:
    """The run's own descriptors, which a forked replacement must close."""
    return tuple(conn for conn in (run._wakeup_reader, run._wakeup_writer) if conn is not None)
