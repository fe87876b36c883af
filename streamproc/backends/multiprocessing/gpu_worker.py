"""The GPU worker process: runs ``forward`` of every ``map_gpu`` stage, and nothing else.

Protocol: the worker's intake thread (:mod:`.gpu_intake`) reads ``ForwardRequest``s from the
batch pipes of its CPU peers (see ``get_dispatch_schedule``) and uploads each batch to the
device as soon as it is read, while the main thread runs forward; the main thread takes the
oldest uploaded batch, computes it, and queues a ``ForwardResult`` (or ``ForwardFailed``) for
the peer that asked. One sender thread per peer (:mod:`.gpu_sender`) pickles and sends
outputs, so the worker never blocks on a peer that is busy. So between two forwards the main
thread only takes a batch and hands the outputs on. The worker exits when every peer has sent
``NoMoreBatches`` (or closed its pipe), when its parent dies, or when killed by the main
process. A peer that dies is *lost*; with a control pipe (runs that replace dead CPU workers,
see :mod:`.retries`) the worker waits for ``PeerReplaced`` and serves the replacement's
pipes, and ends only once no peer is lost or the control pipe closes.

Uploading while the current batch computes means the next batch's host-to-device copy (on a
side CUDA stream, from pinned memory) overlaps the current forward. The stages' models
share one :class:`~streamproc.gpu.model_cache.ModelCache`; under ``gpu_memory_budget`` the
worker computes first the uploaded batches whose models are on the device
(:class:`~streamproc.gpu.swap_schedule.RoundSchedule`, which states the bounds on swaps and
waits); without one, the oldest batch first.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from ...errors import ExceptionWithTraceback
from ...execution.serialization import dumps_message
from ...gpu.placement import DeviceSpec, describe_device_spec, first_device
from .gpu_intake import BatchIntake
from .gpu_runs import StageKey, batch_picker, end_gpu_run, load_forwards, runner_of, start_gpu_run
from .gpu_sender import PeerSender, close_senders
from .log_forwarding import forward_worker_logs
from .messages import (
    ForwardFailed,
    ForwardResult,
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

    senders = {reader: PeerSender(worker, peer, writer, parent_pid) for peer, reader, writer, _ in channels}
    # A peer's liveness pipe (its only write end is in that CPU worker) wakes the wait when the
    # peer dies, even if a copy of its batch pipe's write end survived it somewhere.
    peer_alive = {alive: reader for _, reader, _, alive in channels}
    peer_of = {reader: peer for peer, reader, _, _ in channels}
    pick_next = batch_picker(runners, settings)

    def on_control(message: Any) -> None:  # a warm pool's run starting or ending, between two forwards
        nonlocal settings, pick_next
        if isinstance(message, StartGPURun):
            started, run_settings = start_gpu_run(message, worker, device, caches, status_conn, where)
            runners.update(((message.run_id, stage), runner) for stage, runner in started.items())
            if started and run_settings != settings:  # runs sharing the worker share settings
                settings = run_settings
                pick_next = batch_picker(runners, settings)
        else:
            with intake.cond:
                end_gpu_run(message.run_id, runners, intake.uploaded)

    intake = BatchIntake(
        worker, where, senders, peer_alive, peer_of, runners, control, on_control,
        lambda peer, writer: PeerSender(worker, peer, writer, parent_pid),
    )
    intake.start()
    while True:
        entry, waited = intake.next_batch(lambda uploaded: pick_next(uploaded))
        clock.stats.idle_seconds += waited  # nothing to compute: waiting for a batch
        if entry is None:
            break
        sender, request, batch = entry
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
            close_senders(senders)
            raise
    intake.join(PARENT_CHECK_INTERVAL_S)
    close_senders(senders)
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


def _report_exit(sender: PeerSender, status_conn: Any, batch_id: int, exc: BaseException, worker: WorkerId, where: str) -> None:
    def crash() -> ExceptionWithTraceback:  # one per message: sending one consumes its traceback
        return ExceptionWithTraceback(as_crash(exc, worker, "in forward"), where)

    sender.queue.put(ForwardFailed(batch_id, crash()))
    try:
        status_conn.send_bytes(dumps_message(WorkerFailed(worker, crash())))
    except OSError:  # the main process is gone or shutting down
        pass
