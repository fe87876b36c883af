"""The CPU worker's side of ``map_gpu`` with GPU workers: send batches, get outputs back.

Runs in a CPU worker. :class:`GPUClient` owns the worker's pipe pairs to the GPU workers of
its dispatch cycle; :class:`RemoteForwardRunner` is the forward runner of one stage: it keeps
up to ``max_pending`` batches in flight, so the worker prepares the next batches while the
GPU computes, and yields outputs in the order the batches were sent.

Bound: batches in flight from one CPU worker <= stages x ``max_pending``; the GPU worker
answers each pipe in order, and a stale answer (for a batch whose task failed) is dropped.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from typing import Any

from ...errors import WorkerCrashedError
from .messages import ForwardFailed, ForwardRequest, NoMoreBatches, WorkerId
from ...execution.serialization import dumps_message, loads_message

#: Batches of one stage in flight per GPU worker of the cycle: one computing, one waiting.
MAX_BATCHES_IN_FLIGHT_PER_GPU = 2
OUTPUT_POLL_INTERVAL_S = 1.0


class GPUClient:
    """Pipes from one CPU worker to its GPU workers.

    Args:
        channels: GPU worker index -> ``(batch pipe writer, output pipe reader)``.
        cycle: the GPU worker indices this CPU worker sends to, in order.
    """

    def __init__(self, worker: WorkerId, channels: dict[int, tuple[Any, Any]], cycle: list[int]) -> None:
        self.worker = worker
        self.channels = channels
        self.cycle = cycle
        self._batch_ids = itertools.count()
        self._arrived: dict[int, Any] = {}
        self._forgotten: set[int] = set()

    def send(self, stage: int, batch: Any, gpu: int) -> int:
        batch_id = next(self._batch_ids)
        data = dumps_message(ForwardRequest(stage, batch_id, batch))
        try:
            self.channels[gpu][0].send_bytes(data)
        except OSError:  # BrokenPipeError, ConnectionResetError
            raise self._gpu_worker_gone(gpu) from None
        return batch_id

    def wait_outputs(self, gpu: int, batch_id: int) -> Any:
        """Blocks until GPU worker ``gpu`` answers ``batch_id``; raises what forward raised."""
        reader = self.channels[gpu][1]
        while batch_id not in self._arrived:
            while not reader.poll(OUTPUT_POLL_INTERVAL_S):
                pass  # the watchdog thread ends this process if the main process dies
            try:
                message = loads_message(reader.recv_bytes())
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
        # A GPU worker only closes its pipes once all its CPU peers said NoMoreBatches, so a
        # closed pipe while this worker still needs it means the GPU worker ended abnormally.
        # Not PipelineShutdownError: when the GPU worker exits with status 0 (os._exit(0) in
        # forward), the main process sees no crash, and this error is the one the user gets.
        return WorkerCrashedError(f"{WorkerId('gpu', gpu)} stopped before answering {self.worker} (its pipe closed)")

    def forget(self, batch_id: int) -> None:
        """Drops the answer to ``batch_id`` when it comes (its task failed)."""
        if self._arrived.pop(batch_id, None) is None:
            self._forgotten.add(batch_id)

    def close(self) -> None:
        """Tells every GPU worker of the cycle that nothing more will come."""
        for writer, reader in self.channels.values():
            try:
                writer.send_bytes(dumps_message(NoMoreBatches()))
            except OSError:
                pass
            writer.close()
            reader.close()


class RemoteForwardRunner:
    """Forward runner of stage ``stage`` in a CPU worker: forward runs on GPU workers."""

    def __init__(self, client: GPUClient, stage: int) -> None:
        self.client = client
        self.stage = stage
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
                pending.append((records, gpu, self.client.send(self.stage, batch, gpu)))
            while pending:
                done_records, gpu, batch_id = pending.popleft()
                yield done_records, self.client.wait_outputs(gpu, batch_id)
        finally:
            for _, _, batch_id in pending:
                self.client.forget(batch_id)
