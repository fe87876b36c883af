"""``sp.WorkerPool``: worker processes (and the models on their GPU workers) kept warm across streams.

Runs in the main process. A :class:`WorkerPool` starts a
:class:`~streamproc.backends.multiprocessing.pool.ProcessPool` once; every stream run with
``set_processing(pool=pool)`` is a :class:`~streamproc.backends.multiprocessing.run._Run` on
those processes: it sends its plan (``StartRun`` to the CPU workers, ``StartGPURun`` to the
GPU workers) instead of starting processes, and ends by draining instead of stopping them
(:mod:`.drain`). GPU workers keep their model caches between runs, so a model equal in
content to one already on the device is not moved again.

Runs sharing a pool interleave task by task: a run starts (at the first record asked for)
as soon as the pool admits it, and its tasks go down the same task pipes as the other active
runs' tasks, each run keeping its own in-flight window (so a worker's pipe holds at most
``MAX_TASKS_IN_FLIGHT_PER_WORKER`` tasks of each run, and a small stream started while a big
one runs waits for at most that many of the big one's tasks per worker before its first task
runs). The workers hold each active run's plan (``StartRun`` ... ``EndRun``) and the GPU
workers its forwards (``StartGPURun`` ... ``EndGPURun``), with one model cache, so equal
models are loaded once. The router thread (:mod:`.router`) reads every worker and hands each
run what carries its run id. A user error, an early break or the end of one run concerns
that run only (:func:`.drain.drain_shared_run`); a dead CPU worker is replaced at once and
fails the runs that had a task on it, the others go on; a dead GPU worker fails the runs
with ``map_gpu`` stages, and the pool restarts once no run is left.

Some runs take turns instead: they have the workers to themselves, and wait for the active
runs to end (those that start meanwhile wait for them). They are the runs whose workers write
part files (``write_parquet`` in workers: a part group per worker), the runs with
``max_task_retries`` (they replace dead workers and requeue tasks themselves), and runs with
``map_gpu`` stages whose model settings (``gpu_memory_budget``, ``model_dtype``) differ from
an active run's (one budget per device). A thread that starts a second stream on the pool
while its first is still open, when the two cannot share the workers, gets a ``RuntimeError``
instead of a deadlock.

Invariant when no run is active: every CPU worker is alive and has answered every run's
``EndRun``; every GPU worker is alive and holds no batch. A run that breaks it (a crash, a
task that does not finish in time) has its dead or killed CPU workers replaced, and a dead GPU
worker restarts the whole pool, before the next run starts.
"""

from __future__ import annotations

import threading
import weakref
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Optional, cast

from ..options import DeviceSpec, ProcessingOptions, device_names

if TYPE_CHECKING:
    from ..backends.multiprocessing.pool import ProcessPool, WorkerHandle
    from ..backends.multiprocessing.topology import Topology
    from ..plan import Plan
    from .pool_lease import PoolLease
    from .router import Router

#: How long ``close()`` waits for a run of another thread to end before stopping the processes.
CLOSE_WAIT_S = 10.0


class _PoolProcesses:
    """The pool's current :class:`ProcessPool` (replaced after a broken GPU worker); what the
    finalizer stops, without a reference to the :class:`WorkerPool`."""

    def __init__(self, topology: Topology, cpu_start_method: str, gpu_start_method: str) -> None:
        self.topology = topology
        self.cpu_start_method = cpu_start_method
        self.gpu_start_method = gpu_start_method
        self.current: Optional[ProcessPool] = None
        self.restarts = 0

    def start(self) -> ProcessPool:
        from ..backends.multiprocessing.pool import ProcessPool

        pool = ProcessPool(self.topology, self.cpu_start_method, self.gpu_start_method)
        self.current = pool
        try:
            # replaceable: every GPU worker gets a control pipe (StartGPURun, PeerReplaced).
            pool.start(None, None, replaceable=True)
        except BaseException:
            self.stop(broken=True)
            raise
        return pool

    def restart(self) -> ProcessPool:
        self.stop(broken=True)
        self.restarts += 1
        return self.start()

    def stop(self, broken: bool = False) -> None:
        """Stops and reaps every process (idempotent); ``broken``: terminate, do not ask."""
        pool, self.current = self.current, None
        if pool is not None:
            pool.shutdown(broken=broken)


class WorkerPool:
    """Worker processes kept warm across streams: ``stream.set_processing(pool=pool)`` runs there.

    Runs in the main process; the workers are the multiprocessing backend's (CPU workers run
    the stream's ops, GPU workers its ``map_gpu`` forwards), started once, here. Options the
    pool owns (worker counts, devices, start method) are refused by ``set_processing`` with
    ``pool=``; every other option is the stream's, per run.

    >>> import streamproc as sp
    >>> with sp.WorkerPool(num_cpu_workers=2) as pool:
    ...     stream = sp.from_iterable(range(6)).map(lambda x: x * 10).set_processing(pool=pool)
    ...     first, second = list(stream), list(stream)
    >>> first == second == [0, 10, 20, 30, 40, 50]
    True

    Streams from several threads run at once, their tasks interleaved on the workers (some
    take turns: see the module docstring); a run that fails, crashes a worker or is left early
    (``break``) gives its workers back, dead ones replaced, without failing the others.
    ``close()`` (or leaving the ``with`` block, or garbage collection, or interpreter exit)
    stops and reaps every process.

    Args:
        num_cpu_workers: CPU worker processes (None: one per spare CPU, as for a stream).
        num_gpu_workers: GPU worker processes (None: one per entry of ``gpu_worker_devices``,
            else one per visible CUDA device, none without CUDA).
        gpu_worker_devices: the GPU workers' devices, as ``set_processing`` takes them.
        process_start_method: "fork", "spawn" or "forkserver" (None: the backend's default).

    Raises:
        ValueError: a bad value, naming the argument; devices or counts this machine cannot hold.
    """

    #: Accepted by ``set_processing(pool=...)`` (a capability, checked without importing this module).
    is_streamproc_pool = True

    def __init__(
        self,
        num_cpu_workers: Optional[int] = None,
        num_gpu_workers: Optional[int] = None,
        gpu_worker_devices: Optional[list[DeviceSpec] | tuple[DeviceSpec, ...]] = None,
        process_start_method: Optional[str] = None,
    ) -> None:
        from ..backends.multiprocessing.cpu_budget import check_worker_counts, default_num_cpu_workers
        from ..backends.multiprocessing.start_method import resolve_start_method
        from ..backends.multiprocessing.topology import build_topology, resolve_gpu_devices

        options = ProcessingOptions().updated(
            num_cpu_workers=num_cpu_workers, num_gpu_workers=num_gpu_workers,
            gpu_worker_devices=gpu_worker_devices, process_start_method=process_start_method,
        )
        # The devices as a stream with a map_gpu stage would get them (refusing absent ones).
        as_plan = cast("Plan", SimpleNamespace(options=options, has_gpu_stage=True))
        gpu_devices = resolve_gpu_devices(as_plan)
        num_cpu = options.num_cpu_workers or default_num_cpu_workers(len(gpu_devices))
        check_worker_counts(num_cpu, len(gpu_devices))
        uses_cuda = any(device.startswith("cuda") for device in device_names(tuple(gpu_devices)))
        # The pool runs streams not known yet: CPU workers are started as for a map_gpu stage.
        cpu_method = resolve_start_method(options.process_start_method, needs_gpu_workers=False, runs_torch=True)
        gpu_method = resolve_start_method(options.process_start_method, needs_gpu_workers=uses_cuda, runs_torch=True)
        self._processes = _PoolProcesses(build_topology(num_cpu, gpu_devices), cpu_method, gpu_method)
        self._state_lock = threading.Lock()
        #: Guards admission: the active runs, the router, runs waiting to have the workers alone.
        self._cond = threading.Condition()
        self._active: dict[int, PoolLease] = {}
        self._exclusive_waiting = 0
        self._router: Optional[Router] = None
        #: Sends on the GPU workers' control pipes (StartGPURun, EndGPURun, a replacement's pipes).
        self._control_lock = threading.Lock()
        #: One per CPU worker index: the shared runs' feeders send one whole message at a time.
        self._send_locks = [threading.Lock() for _ in range(self._processes.topology.num_cpu_workers)]
        self._closed = False
        #: Runs that ended on this pool (any way).
        self.runs_served = 0
        self._processes.start()
        # Garbage collection or interpreter exit stops the processes too (without self).
        self._finalizer = weakref.finalize(self, self._processes.stop, True)

    # -- what the pool is ---------------------------------------------------------------------
    @property
    def num_cpu_workers(self) -> int:
        return self._processes.topology.num_cpu_workers

    @property
    def gpu_worker_devices(self) -> tuple[DeviceSpec, ...]:
        return self._processes.topology.gpu_devices

    @property
    def process_start_methods(self) -> tuple[str, str]:
        """``(CPU workers', GPU workers')`` start methods."""
        return self._processes.cpu_start_method, self._processes.gpu_start_method

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def restarts(self) -> int:
        """Times every process was restarted (after a GPU worker died)."""
        return self._processes.restarts

    def worker_pids(self) -> dict[str, int]:
        """``{"cpu worker 0": pid, ..., "gpu worker 0": pid}``: the live workers now."""
        pool = self._processes.current
        if pool is None:
            return {}
        return {str(w.id): w.process.pid for w in pool.workers if not w.exited and w.process.pid is not None}

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.runs_served} run(s) served"
        devices = f", gpu_worker_devices={list(self.gpu_worker_devices)!r}" if self.gpu_worker_devices else ""
        return f"WorkerPool(num_cpu_workers={self.num_cpu_workers}{devices}; {state})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Options travel to the workers with the plan; a pool means nothing there (the backend
        # strips it first: this is the safety net).
        return (_no_pool, ())

    # -- lifetime -----------------------------------------------------------------------------
    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops and reaps every worker process (main process). Idempotent.

        Waits up to ``CLOSE_WAIT_S`` for the runs of other threads to end; a run still open then
        (or one of this thread: a half-consumed iterator) fails with a crash of its workers.
        """
        from ..errors import WorkerCrashedError

        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        me = threading.get_ident()
        with self._cond:
            self._cond.notify_all()  # runs waiting to start see the pool closed
            mine = any(lease.thread == me for lease in self._active.values())
            self._cond.wait_for(lambda: not self._active, timeout=0 if mine else CLOSE_WAIT_S)
            router, self._router = self._router, None
            open_runs = list(self._active.values())
        if router is not None:
            router.stop()
        for lease in open_runs:  # their collectors hear it next (no router reads for them now)
            if lease.inbox is not None and lease.worker is not None:
                lease.inbox.put(lease.worker, WorkerCrashedError("the WorkerPool was closed during the run"))
        self._finalizer()  # _processes.stop(broken=True): idle workers hold nothing worth waiting for
        from ..execution.shared_weights import close_pool_weights

        close_pool_weights(self)  # the model weight files its runs wrote (no worker maps them now)

    # -- runs (called by the multiprocessing backend) -------------------------------------------
    def process_pool(self) -> ProcessPool:
        """The processes now (for ``explain()``: topology and start methods)."""
        if self._processes.current is None:
            raise ValueError("set_processing(pool=...): this WorkerPool is closed")
        return self._processes.current

    def lease(self) -> PoolLease:
        """A run's hold on the pool (see :class:`~streamproc.backends.multiprocessing.lease.RunLease`)."""
        from .pool_lease import PoolLease

        return PoolLease(self)

    def _admit(self, lease: PoolLease) -> ProcessPool:
        """Waits until ``lease``'s run may start (see the module docstring); the processes, ready.

        Raises:
            ValueError: the pool is closed (or was closed while the run waited).
            RuntimeError: this thread has a run open on the pool that the new one would wait for.
        """
        me = threading.get_ident()
        with self._cond:
            if self._closed:
                raise ValueError("set_processing(pool=...): this WorkerPool is closed")
            mine = any(other.thread == me for other in self._active.values())
            if not self._may_start(lease, mine):
                if mine:
                    raise RuntimeError(
                        "this thread is already running a stream on this WorkerPool (an iterator not consumed to the "
                        "end, or zip() of two streams) that this one cannot share the workers with (it writes parts "
                        "in workers, retries tasks, or has other model settings): such streams run one at a time; "
                        "finish or close the first one"
                    )
                self._exclusive_waiting += lease.exclusive
                try:
                    self._cond.wait_for(lambda: self._closed or self._may_start(lease, False))
                finally:
                    self._exclusive_waiting -= lease.exclusive
            if self._closed or self._processes.current is None:
                raise ValueError("set_processing(pool=...): this WorkerPool was closed while the stream waited for it")
            processes = self._ready_processes() if not self._active else self._processes.current
            self._active[lease.run_id] = lease
            if not lease.exclusive and self._router is None:
                from .router import Router

                self._router = Router(processes, self._replace_for_router)
            return processes

    def _may_start(self, lease: PoolLease, mine: bool) -> bool:
        """Whether ``lease``'s run may start now (under ``_cond``); ``mine``: this thread has one active."""
        active = list(self._active.values())
        if not active:
            return True
        if lease.exclusive or any(other.exclusive for other in active):
            return False
        if self._router is not None and self._router.gpu_lost:
            return False  # the pool restarts once the active runs end
        if self._exclusive_waiting and not mine:
            return False  # a run waiting to have the workers alone goes first
        return not lease.uses_gpu or all(not o.uses_gpu or o.settings == lease.settings for o in active)

    def _replace_for_router(self, index: int, also_close: tuple[object, ...]) -> WorkerHandle:
        """A new process for CPU worker ``index`` (the router's thread, shared runs active)."""
        with self._control_lock:
            pool = self._processes.current
            if self._closed or pool is None:
                raise ValueError("the WorkerPool is closed")
            return pool.replace_cpu_worker(index, also_close=also_close)

    def _ready_processes(self) -> ProcessPool:
        """The processes, every worker alive (one that died between runs is replaced)."""
        from ..backends.multiprocessing.pool import KILL_JOIN_TIMEOUT_S

        pool = self._processes.current
        assert pool is not None
        if any(w.process.exitcode is not None for w in pool.gpu_workers):
            return self._processes.restart()
        for worker in list(pool.cpu_workers):
            if worker.process.exitcode is not None:
                worker.process.join(KILL_JOIN_TIMEOUT_S)
                worker.exited = True
                pool.replace_cpu_worker(worker.id.index)
        return pool

    def _release(self, lease: PoolLease) -> None:
        """``lease``'s run ended: the next may start; the router stops with the last shared run."""
        router = None
        with self._cond:
            self.runs_served += 1
            self._active.pop(lease.run_id, None)
            if self._router is not None and all(other.exclusive for other in self._active.values()):
                router, self._router = self._router, None
                router.stop()
            self._cond.notify_all()


def _no_pool() -> None:
    return None
