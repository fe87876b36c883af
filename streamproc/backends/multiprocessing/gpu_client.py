"""The CPU worker's side of ``map_gpu`` with GPU workers: send batches, get outputs back.

Runs in a CPU worker. :class:`GPUClient` owns the worker's channels to the GPU workers of its
dispatch cycle; :class:`RemoteForwardRunner` is the forward runner of one stage: it keeps up
to ``max_pending`` batches in flight, so the worker prepares the next batches while the GPU
computes, and yields outputs in the order the batches were sent.

Bound: batches in flight from one CPU worker <= 2 tasks x stages x ``max_pending`` (two tasks
overlap at a task boundary, see :mod:`.task_overlap`); the GPU worker answers each pipe in
order, and a stale answer (for a batch whose task failed) is dropped. Two threads of the
worker (the task ending and the next one) may send and wait at once: sends to one GPU worker
are serialised by a lock, and one thread at a time reads a GPU worker's output pipe, filing
the answers it reads for whichever thread waits for them. Large tensors travel through shared
memory (:mod:`.tensor_transport`).
Liveness: every wait for outputs is also a wait on the GPU worker's liveness pipe, whose
only write end that GPU worker holds: it becomes readable (EOF) the moment that process
ends, however it ends.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing.connection
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ...errors import WorkerCrashedError
from ...execution.serialization import dumps_message, loads_message
from . import tensor_transport
from .messages import ForwardFailed, ForwardRequest, ForwardResult, NoMoreBatches, WorkerId

if TYPE_CHECKING:
    from .task_overlap import TaskOverlap

#: Batches of one stage in flight per GPU worker of the cycle (per task): one computing, the
#: rest waiting, uploaded, so that the round trip of one batch (pickle, pipe, the peer sender
#: thread, postprocess) hides behind the forward of the others; 2 capped a 2 ms forward at
#: about 80% busy (issue 10, item 7).
MAX_BATCHES_IN_FLIGHT_PER_GPU = 4
#: Upper bound of one wait for outputs; the liveness pipe wakes it at once if the GPU worker dies.
OUTPUT_WAIT_TIMEOUT_S = 1.0


@dataclass
class GPUChannel:
    """A CPU worker's ends of its pipes to one GPU worker."""

    batch_writer: Any
    output_reader: Any
    #: Read end of the GPU worker's liveness pipe: readable (EOF) once that process is gone.
    gpu_alive: Any

    def close(self) -> None:
        for conn in (self.batch_writer, self.output_reader, self.gpu_alive):
            conn.close()


class GPUClient:
    """Channels from one CPU worker to its GPU workers.

    Args:
        channels: GPU worker index -> its :class:`GPUChannel`.
        cycle: the GPU worker indices this CPU worker sends to, in order.
        main_pid: the main process's pid, which names the shared-memory segments of the run.
    """

    def __init__(self, worker: WorkerId, channels: dict[int, GPUChannel], cycle: list[int], main_pid: int = 0) -> None:
        self.worker = worker
        self.channels = channels
        self.cycle = cycle
        self.main_pid = main_pid
        self._batch_ids = itertools.count()
        self._arrived: dict[int, Any] = {}
        self._forgotten: set[int] = set()
        self._cond = threading.Condition()
        #: Serialise the sends of the worker's threads on each batch pipe.
        self._send_locks = {gpu: threading.Lock() for gpu in channels}
        #: GPU workers whose output pipe a thread of this worker reads now (under ``_cond``).
        self._reading: set[int] = set()
        #: The worker's task overlap (see :mod:`.task_overlap`): once a runner has sent a task's
        #: last batch of a stage and only waits, the next task starts if it is in the task
        #: pipe, or as soon as it arrives there while the wait goes on.
        self.overlap: Optional[TaskOverlap] = None

    def send(self, stage: int, batch: Any, gpu: int, run_id: Optional[int] = None) -> int:
        batch_id = next(self._batch_ids)
        packed, segments = tensor_transport.pack(batch, self.main_pid)
        try:
            data = dumps_message(ForwardRequest(stage, batch_id, packed, run_id))
        except BaseException:
            tensor_transport.discard_names(segments)
            raise
        channel = self.channels[gpu]
        try:
            with self._send_locks[gpu]:
                channel.batch_writer.send_bytes(data)
        except OSError:  # BrokenPipeError, ConnectionResetError
            tensor_transport.discard_names(segments)
            raise self._gpu_worker_gone(gpu) from None
        return batch_id

    def wait_outputs(self, gpu: int, batch_id: int, draining: bool = False) -> Any:
        """Blocks until GPU worker ``gpu`` answers ``batch_id``; raises what forward raised.

        ``draining``: the task has nothing more to send for this stage; the wait also watches
        the task pipe and starts the next task when it comes (see :mod:`.task_overlap`).

        Raises:
            WorkerCrashedError: the GPU worker ended before answering.
        """
        channel = self.channels[gpu]
        while True:
            with self._cond:
                if batch_id in self._arrived:
                    message = self._arrived.pop(batch_id)
                    break
                if gpu in self._reading:  # another thread of this worker reads the pipe: it files ours
                    self._cond.wait(OUTPUT_WAIT_TIMEOUT_S)
                    continue
                self._reading.add(gpu)
            try:
                received = self._read_one(channel, gpu, draining)
            finally:
                with self._cond:
                    self._reading.discard(gpu)
                    self._cond.notify_all()
            if received is not None:
                self._file(received)
        if isinstance(message, ForwardFailed):
            raise message.error
        return tensor_transport.unpack(message.outputs)

    def _read_one(self, channel: GPUChannel, gpu: int, draining: bool) -> Optional[Any]:
        """One answer from ``channel``, or None after :data:`OUTPUT_WAIT_TIMEOUT_S` or a task start without one."""
        overlap = self.overlap
        task_pipe = overlap.task_conn if draining and overlap is not None and overlap.wants_next() else None
        watched = [channel.output_reader, channel.gpu_alive, *([task_pipe] if task_pipe is not None else [])]
        ready = multiprocessing.connection.wait(watched, OUTPUT_WAIT_TIMEOUT_S)
        if task_pipe is not None and task_pipe in ready and channel.output_reader not in ready:
            assert overlap is not None
            overlap.start_next()  # the next task came while this one drains
            return None
        if not ready:
            return None  # the watchdog thread ends this process if the main process dies
        if channel.output_reader not in ready:
            raise self._gpu_worker_gone(gpu)  # the liveness pipe says it is gone, with nothing left to read
        try:
            return loads_message(channel.output_reader.recv_bytes())
        except EOFError:
            raise self._gpu_worker_gone(gpu) from None

    def _file(self, message: Any) -> None:
        """Keeps an answer for the thread that waits for it, or drops a forgotten one (its segments too)."""
        with self._cond:
            forgotten = message.batch_id in self._forgotten
            if forgotten:
                self._forgotten.discard(message.batch_id)
            else:
                self._arrived[message.batch_id] = message
        if forgotten and isinstance(message, ForwardResult):
            tensor_transport.discard(message.outputs)

    def _gpu_worker_gone(self, gpu: int) -> WorkerCrashedError:
        # Not PipelineShutdownError: the GPU worker ended while this worker still needed it,
        # whatever its exit status (os._exit(0) in forward included). The main process, which
        # can read the exit code, reports the GPU worker's crash instead (``gpu_worker_gone``).
        error = WorkerCrashedError(f"{WorkerId('gpu', gpu)} stopped before answering {self.worker}: it is no longer running")
        error.gpu_worker_gone = gpu  # type: ignore[attr-defined]
        return error

    def forget(self, batch_id: int) -> None:
        """Drops the answer to ``batch_id`` when it comes (its task failed)."""
        with self._cond:
            message = self._arrived.pop(batch_id, None)
            if message is None:
                self._forgotten.add(batch_id)
        if isinstance(message, ForwardResult):
            tensor_transport.discard(message.outputs)

    def close(self) -> None:
        """Tells every GPU worker of the cycle that nothing more will come."""
        for channel in self.channels.values():
            try:
                channel.batch_writer.send_bytes(dumps_message(NoMoreBatches()))
            except OSError:
                pass
            channel.close()


class RemoteForwardRunner:
    """Forward runner of stage ``stage`` in a CPU worker: forward runs on GPU workers."""

    #: Where forward runs, for the run's stats (``StageStats.forward_where``).
    location = "GPU workers"

    def __init__(
        self, client: GPUClient, stage: int, run_id: Optional[int] = None, last_gpu_stage: bool = True
    ) -> None:
        self.client = client
        self.stage = stage
        self.run_id = run_id  # a warm pool's GPU worker serves several runs' stages
        #: The plan's last ``map_gpu`` stage: its drain is where the next task starts, so that
        #: every batch of a task is sent before the next task's first (the GPU worker serves a
        #: pipe in order: the task ending is never queued behind the next one).
        self.last_gpu_stage = last_gpu_stage
        self.max_pending = MAX_BATCHES_IN_FLIGHT_PER_GPU * len(client.cycle)
        self._next_gpu = itertools.cycle(client.cycle)

    def run(self, batches: Iterator[tuple[list[Any], Any]]) -> Iterator[tuple[list[Any], Any]]:
        pending: collections.deque[tuple[list[Any], int, int]] = collections.deque()
        try:
            for records, batch in batches:
                if len(pending) >= self.max_pending:
                    done_records, gpu, batch_id = pending.popleft()
                    yield done_records, self.client.wait_outputs(gpu, batch_id)
                gpu = next(self._next_gpu)
                pending.append((records, gpu, self.client.send(self.stage, batch, gpu, self.run_id)))
            overlap = self.client.overlap
            if pending and overlap is not None and self.last_gpu_stage:
                overlap.start_next()  # no drain: the worker's next task starts now if it is there
            while pending:
                done_records, gpu, batch_id = pending.popleft()
                yield done_records, self.client.wait_outputs(gpu, batch_id, draining=self.last_gpu_stage)
        finally:
            for _, _, batch_id in pending:
                self.client.forget(batch_id)
