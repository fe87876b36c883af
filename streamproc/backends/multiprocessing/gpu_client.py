"""The CPU worker's side of ``map_gpu`` with GPU workers: send batches, get outputs back.

Runs in a CPU worker. :class:`GPUClient` owns the worker's channels to the GPU workers of its
dispatch cycle; :class:`RemoteForwardRunner` is the forward runner of one stage: it keeps up
to ``max_pending`` batches in flight, so the worker prepares the next batches while the GPU
computes, and yields outputs in the order the batches were sent.

Bound: batches in flight from one CPU worker <= stages x ``max_pending``; the GPU worker
answers each pipe in order, and a stale answer (for a batch whose task failed) is dropped.
Liveness: every wait for outputs is also a wait on the GPU worker's liveness pipe, whose
only write end that GPU worker holds: it becomes readable (EOF) the moment that process
ends, however it ends.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing.connection
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from ...errors import WorkerCrashedError
from ...execution.serialization import dumps_message, loads_message
from .messages import ForwardFailed, ForwardRequest, NoMoreBatches, WorkerId

#: Batches of one stage in flight per GPU worker of the cycle: one computing, one waiting.
MAX_BATCHES_IN_FLIGHT_PER_GPU = 2
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
    """

    def __init__(self, worker: WorkerId, channels: dict[int, GPUChannel], cycle: list[int]) -> None:
        self.worker = worker
        self.channels = channels
        self.cycle = cycle
        self._batch_ids = itertools.count()
        self._arrived: dict[int, Any] = {}
        self._forgotten: set[int] = set()

    def send(self, stage: int, batch: Any, gpu: int, run_id: Optional[int] = None) -> int:
        batch_id = next(self._batch_ids)
        data = dumps_message(ForwardRequest(stage, batch_id, batch, run_id))
        try:
            self.channels[gpu].batch_writer.send_bytes(data)
        except OSError:  # BrokenPipeError, ConnectionResetError
            raise self._gpu_worker_gone(gpu) from None
        return batch_id

    def wait_outputs(self, gpu: int, batch_id: int) -> Any:
        """Blocks until GPU worker ``gpu`` answers ``batch_id``; raises what forward raised.

        Raises:
            WorkerCrashedError: the GPU worker ended before answering.
        """
        channel = self.channels[gpu]
        while batch_id not in self._arrived:
            ready = multiprocessing.connection.wait([channel.output_reader, channel.gpu_alive], OUTPUT_WAIT_TIMEOUT_S)
            if not ready:
                continue  # the watchdog thread ends this process if the main process dies
            if channel.output_reader not in ready:
                raise self._gpu_worker_gone(gpu)  # the liveness pipe says it is gone, with nothing left to read
            try:
                message = loads_message(channel.output_reader.recv_bytes())
            except EOFError:
                raise self._gpu_worker_gone(gpu) from None
            if message.batch_id in self._forgotten:
                self._forgotten.discard(message.batch_id)
            else:
                self._arrived[message.batch_id] = message
        message = self._arrived.pop(batch_id)
        if isinstance(message, ForwardFailed):
            raise message.error
        return message.outputs

    def _gpu_worker_gone(self, gpu: int) -> WorkerCrashedError:
        # Not PipelineShutdownError: the GPU worker ended while this worker still needed it,
        # whatever its exit status (os._exit(0) in forward included). The main process, which
        # can read the exit code, reports the GPU worker's crash instead (``gpu_worker_gone``).
        error = WorkerCrashedError(f"{WorkerId('gpu', gpu)} stopped before answering {self.worker}: it is no longer running")
        error.gpu_worker_gone = gpu  # type: ignore[attr-defined]
        return error

    def forget(self, batch_id: int) -> None:
        """Drops the answer to ``batch_id`` when it comes (its task failed)."""
        if self._arrived.pop(batch_id, None) is None:
            self._forgotten.add(batch_id)

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

    def __init__(self, client: GPUClient, stage: int, run_id: Optional[int] = None) -> None:
        self.client = client
        self.stage = stage
        self.run_id = run_id  # a warm pool's GPU worker serves several runs' stages
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
            while pending:
                done_records, gpu, batch_id = pending.popleft()
                yield done_records, self.client.wait_outputs(gpu, batch_id)
        finally:
            for _, _, batch_id in pending:
                self.client.forget(batch_id)
