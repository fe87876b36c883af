"""The worker processes of the multiprocessing backend: start them, watch them, stop them.

A :class:`ProcessPool` owns processes and pipes, nothing about a run: which tasks a worker
holds, and what its results mean, are the run's (:mod:`.run`). Each run talks to the CPU
workers through their task pipes (``StartRun`` ... ``EndRun``), so one pool can serve several
runs in turn. A warm pool (:class:`streamproc.WorkerPool`) is started once, with
``forwards_bytes=None`` and ``replaceable=True``, and each run then sends its GPU workers its
forwards with :meth:`ProcessPool.begin_gpu_run`.

Descriptors (see NOTE [ streamproc shutdown ] in :mod:`.run` for the rest of the protocol):
every pipe end the main process holds is listed in ``_held``. A forked child inherits all of
them; it closes those that are not its own first thing
(:func:`.worker_runtime.start_worker_process`), so that a pipe's write end lives only in the
process that writes it, and its reader sees EOF as soon as that process dies. Spawned and
forkserver children inherit nothing but what they are passed.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import reduction
from typing import Any, Optional

from ...errors import WorkerCrashedError
from ...execution.serialization import dumps_message, loads_message
from .cpu_worker import run_cpu_worker
from .environment import format_exit_code
from .gpu_client import GPUChannel
from .messages import PeerReplaced, RunEnded, StartGPURun, Stop, WorkerDone, WorkerId
from .topology import Topology

SHUTDOWN_JOIN_TIMEOUT_S = 5.0
KILL_JOIN_TIMEOUT_S = 2.0
_SPAWN_HINT = (
    "; it died before running any streamproc code. Under {method!r} every worker re-imports your main "
    "module: if your script runs a stream at import time, put that code under `if __name__ == \"__main__\":` "
    "(the worker's traceback is on stderr)"
)


@dataclass
class WorkerHandle:
    """Main-process handle of one worker process and its pipe ends."""

    id: WorkerId
    process: Any
    #: Main -> worker task pipe (CPU workers); a GPU worker's control pipe (None: no replacements).
    task_conn: Optional[Any]
    #: Worker -> main: results (CPU workers) or status (GPU workers).
    result_conn: Any
    start_method: str
    #: The worker said ``WorkerStarted``: it runs streamproc code.
    started: bool = False
    #: A GPU worker said ``WorkerDone``: it ended normally, every CPU peer having stopped.
    done: bool = False
    #: The process ended and was reaped (its sentinel no longer waited on).
    exited: bool = False
    #: Its exit code, kept once the pool has shut down and closed the process object.
    exitcode: Optional[int] = None
    extra_conns: list[Any] = field(default_factory=list)

    def crash_error(self, doing: str = "") -> WorkerCrashedError:
        """The error for this worker's unexpected end, with its exit code or signal."""
        exitcode = self.process.exitcode
        code = format_exit_code(exitcode) if exitcode is not None else "exit status unknown"
        message = f"{self.id} (pid {self.process.pid}) died unexpectedly{doing}: {code}"
        if not self.started and self.start_method != "fork":
            message += _SPAWN_HINT.format(method=self.start_method)
        return WorkerCrashedError(message)


def _prepare_parent_for_fork() -> None:
    """Makes forked workers cheaper: shared imports done once, the parent's objects left alone.

    pyarrow imports pandas on its first conversion; done here, the forked workers inherit it
    instead of each importing it (about 0.3 s of CPU per worker). ``gc.freeze()`` keeps the
    workers' collections from traversing, and so copying on write, every object inherited from
    the parent; the parent unfreezes once the workers have started.
    """
    if "pyarrow" in sys.modules and "pandas" not in sys.modules:
        try:
            import pandas  # noqa: F401
        except ImportError:
            pass
    gc.freeze()


class ProcessPool:
    """CPU worker processes (and GPU worker processes) with their pipes. Not thread-safe.

    Args:
        topology: how many CPU workers, the GPU workers' devices (a device or a group each), who sends to whom.
        cpu_start_method / gpu_start_method: ``multiprocessing`` start methods.
    """

    def __init__(self, topology: Topology, cpu_start_method: str, gpu_start_method: str) -> None:
        self.topology = topology
        self.cpu_start_method = cpu_start_method
        self.gpu_start_method = gpu_start_method
        self.cpu_workers: list[WorkerHandle] = []
        self.gpu_workers: list[WorkerHandle] = []
        self._held: list[Any] = []
        self._is_shut_down = False
        self._context: Any = None
        self._cpu_alive_writers: list[Any] = []
        self._gpu_channels: dict[int, dict[int, GPUChannel]] = {}
        #: Per CPU worker index (with ``task_timeout``): the ``time.monotonic()`` of its task's
        #: last progress, written by the worker's watchdog thread (see :mod:`.watchdog`).
        self.progress: list[Any] = []
        self.task_timeout: Optional[float] = None
        self._replaceable = False
        #: ``RunEnded``/``WorkerDone`` messages read at shutdown (the workers' run stats).
        self.final_reports: list[Any] = []

    @property
    def workers(self) -> list[WorkerHandle]:
        return [*self.cpu_workers, *self.gpu_workers]

    def start(self, forwards_bytes: Optional[bytes], task_timeout: Optional[float] = None, replaceable: bool = False) -> None:
        """Starts the GPU workers (with ``forwards_bytes``, when the topology has any), then the CPU workers.

        ``task_timeout``: each CPU worker runs a watchdog thread (see :mod:`.watchdog`) that
        reports a task making no progress for that long, and publishes its progress in
        ``self.progress[i]`` for the main process's backstop. ``replaceable``: a CPU worker that
        dies may be replaced (:meth:`replace_cpu_worker`): each GPU worker gets a control pipe
        to learn its new peers' pipes, and the main process keeps the GPU workers' liveness
        pipes to hand to the replacements.
        """
        self._replaceable = replaceable
        context: Any = multiprocessing.get_context(self.cpu_start_method)
        self._context = context
        self.task_timeout = task_timeout
        if task_timeout is not None:
            self.progress = [context.RawValue("d", 0.0) for _ in range(self.topology.num_cpu_workers)]
        # Liveness pipes of the CPU workers, for their GPU workers to wait on: each CPU worker
        # holds the only write end of its own.
        cpu_alive = [self._pipe(context) for _ in range(self.topology.num_cpu_workers)] if self.topology.gpu_devices else []
        channels = self._start_gpu_workers(forwards_bytes, [reader for reader, _ in cpu_alive]) if cpu_alive else {}
        self._close(*(reader for reader, _ in cpu_alive))
        if self.cpu_start_method == "fork":
            _prepare_parent_for_fork()
        self._gpu_channels = channels
        try:
            for index in range(self.topology.num_cpu_workers):
                alive_writer = cpu_alive[index][1] if cpu_alive else None
                self.cpu_workers.append(self._start_cpu_worker(context, index, channels.get(index, {}), alive_writer))
        finally:
            if self.cpu_start_method == "fork":
                gc.unfreeze()
        # Every CPU peer has its copies of the GPU workers' liveness pipes now (a replacement
        # gets those kept here).
        for worker in self.gpu_workers:
            if not replaceable:
                self._close(*worker.extra_conns)
                worker.extra_conns = []

    def begin_gpu_run(self, run_id: int, forwards_bytes: bytes) -> None:
        """Sends each GPU worker run ``run_id``'s forwards (a warm pool; main process, before the run's first task).

        Raises:
            WorkerCrashedError: a GPU worker is gone (its control pipe is broken).
        """
        data = dumps_message(StartGPURun(run_id, forwards_bytes))
        for handle in self.gpu_workers:
            assert handle.task_conn is not None, "a warm pool is started with replaceable=True"
            try:
                handle.task_conn.send_bytes(data)
            except OSError:
                handle.process.join(KILL_JOIN_TIMEOUT_S)
                raise handle.crash_error(" before the run started") from None

    def _duplex_pipe(self, context: Any) -> tuple[Any, Any]:
        """A Unix socket pair (descriptors can be sent over it: :func:`multiprocessing.reduction.sendfds`)."""
        ends = context.Pipe(duplex=True)
        self._held += list(ends)
        return ends

    def _pipe(self, context: Any) -> tuple[Any, Any]:
        reader, writer = context.Pipe(duplex=False)
        self._held += [reader, writer]
        return reader, writer

    def _close(self, *conns: Any) -> None:
        for conn in conns:
            conn.close()
            self._held.remove(conn)

    def _inherited(self, method: str, own: list[Any]) -> list[Any]:
        """What a child started with ``method`` must close: every end held here but its own."""
        if method != "fork":
            return []
        mine = {id(conn) for conn in own}
        return [conn for conn in self._held if id(conn) not in mine]

    def _start_gpu_workers(self, forwards_bytes: Optional[bytes], cpu_alive: list[Any]) -> dict[int, dict[int, GPUChannel]]:
        """Starts the GPU workers; returns each CPU worker's channels to its GPU workers.

        ``cpu_alive[i]`` is the read end of CPU worker ``i``'s liveness pipe.
        """
        # Imported here: a run without GPU workers (and each worker it forks) never loads it.
        from .gpu_worker import run_gpu_worker

        context: Any = multiprocessing.get_context(self.gpu_start_method)
        cpu_ends: dict[int, dict[int, GPUChannel]] = {}
        for index, device in enumerate(self.topology.gpu_devices):
            gpu_ends = []
            alive_reader, alive_writer = self._pipe(context)
            for peer in self.topology.peers_of_gpu(index):
                batch_reader, batch_writer = self._pipe(context)
                output_reader, output_writer = self._pipe(context)
                cpu_ends.setdefault(peer, {})[index] = GPUChannel(batch_writer, output_reader, alive_reader)
                gpu_ends.append((peer, batch_reader, output_writer, cpu_alive[peer]))
            status_reader, status_writer = self._pipe(context)
            own = [status_writer, alive_writer] + [conn for _, *ends in gpu_ends for conn in ends]
            control, gpu_control = self._duplex_pipe(context) if self._replaceable else (None, None)
            if gpu_control is not None:
                own.append(gpu_control)
            process = context.Process(
                target=run_gpu_worker,
                args=(index, device, forwards_bytes, gpu_ends, status_writer, alive_writer, os.getpid(),
                      self._inherited(self.gpu_start_method, own), gpu_control),
                name=f"streamproc-gpu-{index}",
                daemon=True,
            )
            handle = WorkerHandle(WorkerId("gpu", index), process, None, status_reader, self.gpu_start_method)
            handle.extra_conns = [alive_reader]  # closed once the CPU peers have their copies
            handle.task_conn = control  # main -> GPU worker: PeerReplaced (see replace_cpu_worker)
            self.gpu_workers.append(handle)
            process.start()
            # The child holds its own ends; closing ours lets a dead child break the pipes.
            self._close(*(conn for conn in own if conn not in cpu_alive))
        return cpu_ends

    def _start_cpu_worker(
        self,
        context: Any,
        index: int,
        channels: dict[int, GPUChannel],
        alive_writer: Optional[Any],
        also_close: Sequence[Any] = (),
    ) -> WorkerHandle:
        task_reader, task_writer = self._pipe(context)
        result_reader, result_writer = self._pipe(context)
        channel_ends = [conn for channel in channels.values() for conn in (channel.batch_writer, channel.output_reader)]
        if alive_writer is not None:
            channel_ends.append(alive_writer)  # held by the worker, never written
        own = [task_reader, result_writer, *channel_ends, *(channel.gpu_alive for channel in channels.values())]
        cycle = list(self.topology.cycles[index])
        inherited = self._inherited(self.cpu_start_method, own)
        if self.cpu_start_method == "fork":
            inherited += list(also_close)
        progress = self.progress[index] if self.progress else None
        process = context.Process(
            target=run_cpu_worker,
            args=(index, task_reader, result_writer, os.getpid(), inherited, channels, cycle, alive_writer,
                  self.task_timeout, progress),
            name=f"streamproc-cpu-{index}",
            daemon=True,
        )
        handle = WorkerHandle(WorkerId("cpu", index), process, task_writer, result_reader, self.cpu_start_method)
        process.start()
        self._close(task_reader, result_writer, *channel_ends)
        return handle

    def replace_cpu_worker(self, index: int, also_close: Sequence[Any] = ()) -> WorkerHandle:
        """Starts a fresh process for CPU worker ``index``, whose process ended (and was reaped).

        The new process gets new pipes; ``also_close`` are descriptors of the main process that
        a forked child must close (the run's own pipes). With GPU workers, see
        :meth:`_replace_gpu_channels`.
        """
        old = self.cpu_workers[index]
        self._close(*(conn for conn in (old.task_conn, old.result_conn) if conn in self._held))
        channels: dict[int, GPUChannel] = {}
        alive_writer = None
        if self.topology.gpu_devices:
            channels, alive_writer = self._replace_gpu_channels(index)
        handle = self._start_cpu_worker(self._context, index, channels, alive_writer, also_close)
        self.cpu_workers[index] = handle
        return handle

    def _replace_gpu_channels(self, index: int) -> tuple[dict[int, GPUChannel], Any]:
        """New pipes between CPU worker ``index``'s replacement and its GPU workers.

        Each GPU worker of its cycle is sent ``PeerReplaced(index)`` on its control pipe, then
        its ends of the new pipes (batch reader, output writer, the new peer's liveness reader)
        as descriptors (``SCM_RIGHTS``); it drops the dead peer's pipes and serves the new
        ones. Returns the replacement's channels and the write end of its liveness pipe.

        Raises:
            WorkerCrashedError: a GPU worker is gone (its control pipe is broken).
        """
        context = self._context
        alive_reader, alive_writer = self._pipe(context)
        channels: dict[int, GPUChannel] = {}
        for gpu in sorted(set(self.topology.cycles[index])):
            handle = self.gpu_workers[gpu]
            assert handle.task_conn is not None, "the pool was started with replaceable=False"
            batch_reader, batch_writer = self._pipe(context)
            output_reader, output_writer = self._pipe(context)
            try:
                handle.task_conn.send_bytes(dumps_message(PeerReplaced(index)))
                with socket.fromfd(handle.task_conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    reduction.sendfds(sock, [batch_reader.fileno(), output_writer.fileno(), alive_reader.fileno()])
            except OSError:
                handle.process.join(KILL_JOIN_TIMEOUT_S)
                raise handle.crash_error(f" before it could take the replacement of cpu worker {index}") from None
            finally:
                # The descriptors travelled (duplicated) with the message: ours may go.
                self._close(batch_reader, output_writer)
            channels[gpu] = GPUChannel(batch_writer, output_reader, handle.extra_conns[0])
        self._close(alive_reader)
        return channels, alive_writer

    def live_workers(self) -> list[WorkerHandle]:
        return [worker for worker in self.workers if not worker.exited]

    def reap(self, worker: WorkerHandle) -> None:
        """Joins a worker whose sentinel fired (it has ended)."""
        worker.process.join(KILL_JOIN_TIMEOUT_S)
        worker.exited = True

    def terminate(self) -> None:
        """SIGTERM to every live worker (a broken run: their work is not needed)."""
        for worker in self.workers:
            if worker.process.pid is not None and worker.process.is_alive():
                worker.process.terminate()

    def shutdown(self, broken: bool) -> None:
        """Stops and reaps every worker, then closes every pipe end. Idempotent.

        After a complete run each CPU worker is sent ``Stop`` and exits by itself (its GPU
        workers then see every peer gone and exit too); on a broken run they are terminated.
        Workers still alive after ``SHUTDOWN_JOIN_TIMEOUT_S`` are killed. Nothing waits
        without a timeout. The caller has stopped every thread that sends on the task pipes.
        """
        if self._is_shut_down:
            return
        self._is_shut_down = True
        if broken:
            self.terminate()
        else:
            self._send_stop()
        # No peer will be replaced any more: a GPU worker waiting for one ends at once.
        for worker in self.gpu_workers:
            if worker.task_conn is not None and worker.task_conn in self._held:
                self._close(worker.task_conn)
        processes = [w.process for w in self.workers if w.process.pid is not None]
        deadline = time.monotonic() + SHUTDOWN_JOIN_TIMEOUT_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(KILL_JOIN_TIMEOUT_S)
        self.final_reports = self._read_final_reports()
        for conn in list(self._held):
            self._close(conn)
        for worker in self.workers:
            if worker.process.pid is not None and worker.process.exitcode is not None:
                worker.exitcode = worker.process.exitcode
                worker.process.close()

    def _read_final_reports(self) -> list[Any]:
        """The ``RunEnded``/``WorkerDone`` messages (with their stats) the workers sent as they ended, unread."""
        reports: list[Any] = []
        for worker in self.workers:
            try:
                while worker.result_conn.poll():
                    message = loads_message(worker.result_conn.recv_bytes())
                    if isinstance(message, (RunEnded, WorkerDone)):
                        reports.append(message)
            except Exception:  # EOF, a closed pipe, an unreadable message: only its stats are lost
                pass
        return reports

    def _send_stop(self) -> None:
        stop = dumps_message(Stop())
        for worker in self.cpu_workers:
            if worker.exited:
                continue
            assert worker.task_conn is not None
            try:
                # A few bytes to an idle worker: it reads its pipe, so this cannot block for long.
                worker.task_conn.send_bytes(stop)
            except OSError:  # it is gone already
                pass
