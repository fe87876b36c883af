"""The GPU worker process: runs ``forward`` of every ``map_gpu`` stage, and nothing else.

Protocol: the worker reads ``ForwardRequest``s from the batch pipes of its CPU peers (see
``get_dispatch_schedule``), uploads each batch to its device as soon as it is read, runs the
oldest uploaded batch's forward, and queues a ``ForwardResult`` (or ``ForwardFailed``) for the
peer that asked. One sender thread per peer pickles and sends outputs, so the loop never
blocks on a peer that is busy; it exits when every peer has sent ``NoMoreBatches`` (or closed
its pipe), when its parent dies, or when killed by the main process. A peer that dies is
*lost*; with a control pipe (runs that replace dead CPU workers, see :mod:`.retries`) the
worker waits for ``PeerReplaced`` and serves the replacement's pipes, and ends only once no
peer is lost or the control pipe closes.

Reading every ready request before computing one means the next batch's host-to-device copy
(on a side CUDA stream, from pinned memory) overlaps the current forward. The stages' models
share one :class:`~streamproc.gpu.model_cache.ModelCache`; under ``gpu_memory_budget`` the
worker computes first the uploaded batches whose models are on the device
(:class:`~streamproc.gpu.swap_schedule.RoundSchedule`, which states the bounds on swaps and
waits); without one, the oldest batch first.
"""

from __future__ import annotations

import collections
import multiprocessing.connection
import queue
import socket
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Optional

from ...errors import ExceptionWithTraceback, SerializationError
from ...execution.serialization import dumps_message, loads_message
from ...gpu.placement import DeviceSpec, describe_device_spec, first_device
from . import tensor_transport
from .gpu_runs import StageKey, batch_picker, end_gpu_run, load_forwards, runner_of, start_gpu_run
from .log_forwarding import forward_worker_logs
from .messages import (
    EndGPURun,
    ForwardFailed,
    ForwardRequest,
    ForwardResult,
    NoMoreBatches,
    PeerReplaced,
    StartGPURun,
    WorkerDone,
    WorkerFailed,
    WorkerId,
    WorkerStarted,
)
from .worker_runtime import PARENT_CHECK_INTERVAL_S, as_crash, start_worker_process
from .worker_stats import WorkerClock

if TYPE_CHECKING:
    from ...gpu import DeviceForward, ModelCache
    from ...gpu.model_cache import ModelSettings


class _PeerSender:
    """Sends outputs to one CPU peer from thread ``streamproc-gpu-<i>-to-cpu-<j>``.

    The queue holds at most the peer's in-flight batches (the peer bounds them), so it is
    bounded without blocking the GPU loop. Large output tensors go through shared memory
    (:mod:`.tensor_transport`); the peer unlinks their segments when it reads them.
    """

    def __init__(self, worker: WorkerId, peer: int, conn: Any, main_pid: int = 0) -> None:
        self.worker = worker
        self.conn = conn
        self.main_pid = main_pid
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"streamproc-gpu-{worker.index}-to-cpu-{peer}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            message = self.queue.get()
            if message is None:
                return
            segments: list[str] = []
            try:
                if isinstance(message, ForwardResult):
                    packed, segments = tensor_transport.pack(message.outputs, self.main_pid)
                    message = ForwardResult(message.batch_id, packed)
                data = dumps_message(message)
            except BaseException as exc:
                tensor_transport.discard_names(segments)
                segments = []
                # sys.exit() in a __reduce__ of the outputs must not end this thread silently:
                # the batch would never be answered (see as_crash).
                error = as_crash(exc, self.worker, "while pickling the outputs of forward")
                if error is exc:
                    error = SerializationError(f"outputs of forward cannot be pickled to send back from {self.worker}: {exc}")
                data = dumps_message(ForwardFailed(message.batch_id, ExceptionWithTraceback(error, str(self.worker))))
            try:
                self.conn.send_bytes(data)
            except OSError:  # the peer is gone; the main process deals with it
                tensor_transport.discard_names(segments)
                return

    def close(self, timeout: float) -> None:
        self.queue.put(None)
        self.thread.join(timeout)


def run_gpu_worker(
    index: int,
    device: DeviceSpec,
    forwards_bytes: Optional[bytes],
    channels: list[tuple[int, Any, Any, Any]],
    status_conn: Any,
    alive_conn: Any,
    parent_pid: int,
    inherited: Sequence[Any] = (),
    control: Any = None,
) -> None:
    """Entry point of process ``streamproc-gpu-<index>``; see the module docstring.

    Args:
        device: the worker's device, or its group of devices (model parallel; see
            :mod:`streamproc.gpu.placement`).
        forwards_bytes: dill bytes of ``(forwards, autocast, torch_threads[, log levels[,
            model settings]])``, ``forwards`` mapping a stage index to its
            :class:`~streamproc.execution.split.ForwardStage`; the main process's log levels
            (:mod:`.log_forwarding`) and the :class:`~streamproc.gpu.model_cache.ModelSettings`
            may be left out (pools that tests start by hand). None (a warm pool): no stage
            yet; each run's come in a ``StartGPURun`` on ``control``.
        channels: ``(cpu worker index, batch pipe reader, output pipe writer, the peer's
            liveness pipe reader)`` per peer.
        status_conn: ``WorkerStarted``, then ``WorkerDone`` at a normal end; a start-up failure
            or forward ending the worker (``sys.exit``) is reported here as ``WorkerFailed``.
            The worker's log records travel here too (:mod:`.log_forwarding`).
        alive_conn: write end of this worker's liveness pipe: held, never written; its peers
            see EOF on the read end when this process ends.
        inherited: see :func:`.worker_runtime.start_worker_process`.
        control: main -> this worker (a socket pair): ``PeerReplaced`` and the new peer's
            descriptors, and on a warm pool ``StartGPURun``; None when dead peers are not replaced.
    """
    worker = WorkerId("gpu", index)
    start_worker_process(worker, parent_pid, inherited)
    clock = WorkerClock(str(worker), "gpu")
    status_conn = forward_worker_logs(worker, status_conn)
    status_conn.send_bytes(dumps_message(WorkerStarted(worker)))
    where = f"{worker} ({describe_device_spec(device)})"
    try:
        from ...execution.worker_info import WorkerInfo, set_process_info

        set_process_info(WorkerInfo("gpu", index, 0, first_device(device), None))  # sp.get_worker_info() in forward
        # Model caches outlive runs on a warm pool: one per ModelSettings (budget, dtype).
        caches: dict[Any, ModelCache] = {}
        # Keyed by (run id, stage): None for the run this worker was started for; on a warm
        # pool each active run's, added by StartGPURun and dropped by EndGPURun.
        runners: dict[StageKey, DeviceForward] = {}
        settings: Optional[ModelSettings] = None
        if forwards_bytes is not None:
            started, settings = load_forwards(forwards_bytes, device, caches)
            runners.update(((None, stage), runner) for stage, runner in started.items())
        clock.loaded()  # spawn, imports, models moved to the device
    except BaseException as exc:
        # sys.exit() in a model's __setstate__ or .to(): re-raised as is in the main process,
        # it would exit the user's program (same as the CPU worker's start-up).
        error = as_crash(exc, worker, "while starting")
        status_conn.send_bytes(
            dumps_message(WorkerFailed(worker, ExceptionWithTraceback(error, f"{where}, at start-up")))
        )
        sys.exit(1)

    senders = {reader: _PeerSender(worker, peer, writer, parent_pid) for peer, reader, writer, _ in channels}
    # A peer's liveness pipe (its only write end is in that CPU worker) wakes the wait when the
    # peer dies, even if a copy of its batch pipe's write end survived it somewhere.
    peer_alive = {alive: reader for _, reader, _, alive in channels}
    open_readers = list(senders)
    peer_of = {reader: peer for peer, reader, _, _ in channels}
    lost: set[int] = set()  # peers that died, until replaced
    uploaded: collections.deque[tuple[_PeerSender, ForwardRequest, Any]] = collections.deque()
    pick_next = batch_picker(runners, settings)
    while open_readers or uploaded or (lost and control is not None):
        timeout = 0 if uploaded else PARENT_CHECK_INTERVAL_S
        watched = [*open_readers, *(alive for alive, reader in peer_alive.items() if reader in open_readers)]
        waited = time.perf_counter()
        ready: list[Any] = multiprocessing.connection.wait([*watched, *([control] if control else [])], timeout=timeout)
        if not uploaded:  # nothing to compute: idle, waiting for a batch
            clock.stats.idle_seconds += time.perf_counter() - waited
        # The control pipe first: a warm pool's StartGPURun was sent before its run's batches.
        for reader in sorted(ready, key=lambda conn: conn is not control):
            if reader is control:
                # Every message waiting: a run's EndGPURun may come just before the next one's StartGPURun.
                while control is not None:
                    control_message = _read_control(control)
                    if isinstance(control_message, StartGPURun):
                        started, run_settings = start_gpu_run(control_message, worker, device, caches, status_conn, where)
                        runners.update(((control_message.run_id, stage), runner) for stage, runner in started.items())
                        if started and run_settings != settings:  # runs sharing the worker share settings
                            settings = run_settings
                            pick_next = batch_picker(runners, settings)
                    elif isinstance(control_message, EndGPURun):
                        end_gpu_run(control_message.run_id, runners, uploaded)
                    else:
                        peer = _take_replacement(
                            control_message, control, worker, senders, peer_alive, open_readers, peer_of, parent_pid
                        )
                        if peer is None:
                            control = None  # the main process is shutting down: lost peers stay lost
                            break
                        lost.discard(peer)
                    if not control.poll():
                        break
                continue
            if reader not in peer_alive and reader not in senders:
                continue  # a dead peer's pipe, closed by the replacement just taken
            if reader in peer_alive:
                batches = peer_alive[reader]
                if batches in open_readers and not batches.poll():
                    open_readers.remove(batches)  # the peer is gone; the main process reports it
                    lost.add(peer_of[batches])
                continue
            try:
                message = loads_message(reader.recv_bytes())
            except EOFError:  # the peer died (a normal end says NoMoreBatches first)
                open_readers.remove(reader)
                lost.add(peer_of[reader])
                continue
            if isinstance(message, NoMoreBatches):
                open_readers.remove(reader)
                continue
            runner = runner_of(runners, message)
            if runner is None:  # its run's StartGPURun failed to load (the run reports it)
                error = RuntimeError(f"{where} has no forward for stage {message.stage}: the stream's models failed to load")
                senders[reader].queue.put(ForwardFailed(message.batch_id, ExceptionWithTraceback(error, where)))
                tensor_transport.discard(message.batch)
                continue
            try:
                # The batch's shared-memory segments are unlinked here, read or not (see .tensor_transport).
                uploaded.append((senders[reader], message, runner.upload(tensor_transport.unpack(message.batch))))
            except Exception as exc:
                senders[reader].queue.put(
                    ForwardFailed(message.batch_id, ExceptionWithTraceback(exc, f"{where}, {runner.stage}"))
                )
        if uploaded:
            sender, request, batch = pick_next(uploaded)
            runner = runner_of(runners, request)
            assert runner is not None
            try:
                sender.queue.put(ForwardResult(request.batch_id, runner.compute(batch)))
            except Exception as exc:
                sender.queue.put(ForwardFailed(request.batch_id, ExceptionWithTraceback(exc, f"{where}, {runner.stage}")))
            except BaseException as exc:
                # sys.exit() in forward: this worker ends. Say why, to the main process (which
                # raises it at once) and to the CPU worker that sent the batch: with exit status
                # 0, the main process would take the exit for a normal end.
                _report_exit(sender, status_conn, request.batch_id, exc, worker, f"{where}, {runner.stage}")
                _close_senders(senders)
                raise
    _close_senders(senders)
    stats = clock.run_stats()
    for runner in runners.values():
        stats.h2d_seconds += runner.h2d_seconds
        stats.forward_seconds += runner.forward_seconds
        stats.d2h_seconds += runner.d2h_seconds
        stats.batches += runner.batches
    stats.busy_seconds = stats.h2d_seconds + stats.forward_seconds + stats.d2h_seconds
    cache = next(iter(runners.values())).cache if runners else None
    if cache is not None:
        stats.swaps, stats.swap_seconds = cache.swaps, cache.swap_seconds
    status_conn.send_bytes(dumps_message(WorkerDone(worker, stats)))


def _read_control(control: Any) -> Optional[Any]:
    """The next message on the control pipe (``PeerReplaced`` or ``StartGPURun``); None once it is closed."""
    try:
        return loads_message(control.recv_bytes())
    except (EOFError, OSError):
        return None


def _take_replacement(
    message: Optional[Any],
    control: Any,
    worker: WorkerId,
    senders: dict[Any, _PeerSender],
    peer_alive: dict[Any, Any],
    open_readers: list[Any],
    peer_of: dict[Any, int],
    main_pid: int = 0,
) -> Optional[int]:
    """Reads the descriptors that follow ``message`` (a ``PeerReplaced``) on ``control``; serves the new peer.

    Returns the peer's index, or None when the control pipe is closed (``message`` None).
    """
    if message is None:
        return None
    try:
        with socket.fromfd(control.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            batch_fd, output_fd, alive_fd = reduction.recvfds(sock, 3)
    except (EOFError, OSError):
        return None
    assert isinstance(message, PeerReplaced), message
    for reader in [r for r, peer in peer_of.items() if peer == message.peer]:
        if reader in open_readers:
            open_readers.remove(reader)
        for alive in [a for a, r in peer_alive.items() if r is reader]:
            del peer_alive[alive]
            alive.close()
        senders.pop(reader).close(timeout=PARENT_CHECK_INTERVAL_S)
        del peer_of[reader]
        reader.close()
    batches = Connection(batch_fd, writable=False)
    senders[batches] = _PeerSender(worker, message.peer, Connection(output_fd, readable=False), main_pid)
    peer_alive[Connection(alive_fd, writable=False)] = batches
    peer_of[batches] = message.peer
    open_readers.append(batches)
    return message.peer


def _report_exit(sender: _PeerSender, status_conn: Any, batch_id: int, exc: BaseException, worker: WorkerId, where: str) -> None:
    def crash() -> ExceptionWithTraceback:  # one per message: sending one consumes its traceback
        return ExceptionWithTraceback(as_crash(exc, worker, "in forward"), where)

    sender.queue.put(ForwardFailed(batch_id, crash()))
    try:
        status_conn.send_bytes(dumps_message(WorkerFailed(worker, crash())))
    except OSError:  # the main process is gone or shutting down
        pass


def _close_senders(senders: dict[Any, _PeerSender]) -> None:
    for sender in senders.values():
        sender.close(timeout=PARENT_CHECK_INTERVAL_S * 5)
