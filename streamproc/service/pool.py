"""``sp.WorkerPool``: worker processes (and the models on their GPU workers) kept warm across streams.

Runs in the main process. A :class:`WorkerPool` starts a
:class:`~streamproc.backends.multiprocessing.pool.ProcessPool` once; every stream run with
``set_processing(pool=pool)`` is a :class:`~streamproc.backends.multiprocessing.run._Run` on
those processes: it sends its plan (``StartRun`` to the CPU workers, ``StartGPURun`` to the
GPU workers) instead of starting processes, and ends by draining instead of stopping them
(:mod:`.drain`). GPU workers keep their model caches between runs, so a model equal in
content to one already on the device is not moved again.

Runs take turns: one run at a time holds the pool (a lock, taken when the run starts, i.e. at
the first record asked for, and released when it ends), so streams started from several
threads queue and run one after another, each with every guarantee of a run on its own
processes. A thread that starts a second stream on the pool while its first is still open
gets a ``RuntimeError`` instead of a deadlock.

Invariant between runs: every CPU worker is alive, idle and has answered the last run's
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
    from ..backends.multiprocessing.pool import ProcessPool
    from ..backends.multiprocessing.run import _Run
    from ..backends.multiprocessing.topology import Topology
    from ..plan import Plan

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

    Streams run one at a time (see the module docstring); a run that fails, crashes a worker
    or is left early (``break``) gives its workers back, dead ones replaced, to the next.
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
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._holder: Optional[int] = None  # the thread whose run holds the pool
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

        Waits up to ``CLOSE_WAIT_S`` for a run of another thread to end; a run still open then
        (or one of this thread: a half-consumed iterator) fails with a crash of its workers.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        holder = self._holder
        acquired = self._lock.acquire(timeout=CLOSE_WAIT_S if holder != threading.get_ident() else 0)
        try:
            self._finalizer()  # _processes.stop(broken=True): idle workers hold nothing worth waiting for
        finally:
            if acquired:
                self._lock.release()

    # -- runs (called by the multiprocessing backend) -------------------------------------------
    def process_pool(self) -> ProcessPool:
        """The processes now (for ``explain()``: topology and start methods)."""
        if self._processes.current is None:
            raise ValueError("set_processing(pool=...): this WorkerPool is closed")
        return self._processes.current

    def lease(self) -> _PoolLease:
        """A run's hold on the pool (see :class:`~streamproc.backends.multiprocessing.run.RunLease`)."""
        return _PoolLease(self)

    def _acquire(self) -> ProcessPool:
        if self._closed:
            raise ValueError("set_processing(pool=...): this WorkerPool is closed")
        if self._holder == threading.get_ident():
            raise RuntimeError(
                "this thread is already running a stream on this WorkerPool (an iterator not consumed to the end, "
                "or zip() of two streams): streams on one pool run one at a time; finish or close the first one"
            )
        self._lock.acquire()
        if self._closed or self._processes.current is None:
            self._lock.release()
            raise ValueError("set_processing(pool=...): this WorkerPool was closed while the stream waited for it")
        self._holder = threading.get_ident()
        try:
            return self._ready_processes()
        except BaseException:
            self._release()
            raise

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

    def _release(self) -> None:
        self._holder = None
        self._lock.release()


def _no_pool() -> None:
    return None


class _PoolLease:
    """One run's turn on a :class:`WorkerPool` (main process). See :class:`RunLease`."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._held = False

    def begin(self, run: _Run, forwards_bytes: Optional[bytes]) -> None:
        processes = self.pool._acquire()
        self._held = True
        run.pool = processes
        if forwards_bytes is not None and processes.gpu_workers:
            processes.begin_gpu_run(run.run_id, forwards_bytes)

    def end(self, run: _Run, broken: bool) -> None:
        if not self._held:  # the run failed before its turn (serialization, a closed pool)
            return
        self._held = False
        from .drain import drain_run

        try:
            needs_restart = drain_run(run, broken)
            if needs_restart and not self.pool._closed:
                self.pool._processes.restart()
        except BaseException:
            if not self.pool._closed:
                self.pool._processes.restart()  # whatever broke, the next run gets fresh processes
            raise
        finally:
            self.pool.runs_served += 1
            self.pool._release()
