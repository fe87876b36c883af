"""A GPU worker's sender threads: one per CPU peer, pickling and sending that peer's outputs.

Runs in a GPU worker, in thread ``streamproc-gpu-<i>-to-cpu-<j>``, so that the worker's main
thread never blocks on a peer that is busy (a peer blocked sending a batch to this worker
would otherwise never read its outputs).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from ...errors import ExceptionWithTraceback, SerializationError
from ...execution.serialization import dumps_message
from . import tensor_transport
from .messages import ForwardFailed, ForwardResult, WorkerId
from .worker_runtime import PARENT_CHECK_INTERVAL_S, as_crash


class PeerSender:
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


def close_senders(senders: dict[Any, PeerSender]) -> None:
    """Sends every queued output, then ends each sender thread (waiting a little for each)."""
    for sender in list(senders.values()):  # a copy: the intake thread may still serve a replacement peer
        sender.close(timeout=PARENT_CHECK_INTERVAL_S * 5)
