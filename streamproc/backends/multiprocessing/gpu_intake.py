"""A GPU worker's intake: reads its CPU peers' requests and uploads their batches while forward runs.

Runs in a GPU worker, in thread ``streamproc-gpu-<i>-intake``. The worker's main thread does
nothing between two forwards but take the next uploaded batch (:meth:`BatchIntake.next_batch`)
and hand the last one's outputs to its peer's sender thread: reading a pipe, unpickling a
request and starting its upload all happen here, while the main thread waits on the device
(``forward`` releases the GIL while kernels run, and a CUDA stream synchronize releases it).
Done between two forwards, that work cost 0.3-0.7 ms a batch on the stand-in device of
``benchmarks/bench_device_busy.py`` (code run right after a thread wakes from a wait of
milliseconds runs with cold caches, several times slower than the same code in a busy loop),
which capped a 2 ms forward near 80% busy.

The intake owns the peers' pipes: it serves a replaced peer's pipes (``PeerReplaced`` on the
control pipe), and marks a peer lost when its pipes close. What changes what the main thread
computes with (a warm pool's ``StartGPURun``, which loads models, and ``EndGPURun``) is run by
the main thread between two forwards (:meth:`BatchIntake.run_in_main`), as before this
thread existed, so that models, runners and the batch picker are only ever touched by the
thread that computes.
"""

from __future__ import annotations

import collections
import multiprocessing.connection
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Optional

from ...errors import ExceptionWithTraceback
from ...execution.serialization import loads_message
from . import tensor_transport
from .gpu_runs import StageKey, Uploaded, runner_of
from .messages import EndGPURun, ForwardFailed, NoMoreBatches, PeerReplaced, StartGPURun, WorkerId
from .worker_runtime import PARENT_CHECK_INTERVAL_S

if TYPE_CHECKING:
    from ...gpu import DeviceForward
    from .gpu_sender import PeerSender


class BatchIntake:
    """Requests read and batches uploaded for the main thread of GPU worker ``worker``.

    Args:
        senders: batch pipe reader -> the :class:`~.gpu_sender.PeerSender` of that peer.
        peer_alive: the peers' liveness pipe readers -> their batch pipe readers.
        peer_of: batch pipe reader -> the peer's CPU worker index.
        runners: the worker's forwards by (run id, stage); read here, changed by the main thread.
        control: main process -> this worker (``PeerReplaced``, ``StartGPURun``,
            ``EndGPURun``); None when dead peers are not replaced.
        on_control: runs a ``StartGPURun`` or ``EndGPURun`` (called in the main thread).
        make_sender: the sender of a replacement peer (``peer index, output pipe writer``).
    """

    def __init__(
        self,
        worker: WorkerId,
        where: str,
        senders: dict[Any, PeerSender],
        peer_alive: dict[Any, Any],
        peer_of: dict[Any, int],
        runners: dict[StageKey, DeviceForward],
        control: Any,
        on_control: Callable[[Any], None],
        make_sender: Callable[[int, Any], PeerSender],
    ) -> None:
        self.worker = worker
        self.where = where
        self.senders = senders
        self.peer_alive = peer_alive
        self.peer_of = peer_of
        self.open_readers = list(senders)
        self.lost: set[int] = set()  # peers that died, until replaced
        self.runners = runners
        self.control = control
        self.on_control = on_control
        self.make_sender = make_sender
        #: Uploaded batches, oldest first; the main thread takes them (under ``cond``).
        self.uploaded: collections.deque[Uploaded] = collections.deque()
        self.cond = threading.Condition()
        self._actions: collections.deque[tuple[Any, threading.Event]] = collections.deque()
        self._done = False
        self._error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name=f"streamproc-gpu-{worker.index}-intake", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # -- main thread ------------------------------------------------------------------------

    def next_batch(self, pick: Callable[[collections.deque[Uploaded]], Uploaded]) -> tuple[Optional[Uploaded], float]:
        """The next batch to compute, as ``pick`` chooses it, and the seconds waited for one (main thread).

        Runs the control messages the intake passed on first. Returns ``(None, waited)`` once
        every peer has ended and every batch was taken.

        Raises:
            BaseException: what ended the intake thread (a request that cannot be unpickled).
        """
        waited = 0.0
        while True:
            with self.cond:
                if not self.uploaded and not self._actions and not self._done:
                    start = time.perf_counter()
                    while not self.uploaded and not self._actions and not self._done:
                        self.cond.wait()
                    waited += time.perf_counter() - start
                action = self._actions.popleft() if self._actions else None
                if action is None:
                    if self._error is not None:
                        raise self._error
                    return (pick(self.uploaded) if self.uploaded else None), waited
            message, handled = action
            try:
                self.on_control(message)
            finally:
                handled.set()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    # -- intake thread ----------------------------------------------------------------------

    def run_in_main(self, message: Any) -> None:
        """Has the main thread run ``message`` (``StartGPURun``, ``EndGPURun``) between two
        forwards; returns once it ran (intake thread)."""
        handled = threading.Event()
        with self.cond:
            self._actions.append((message, handled))
            self.cond.notify()
        handled.wait()

    def _run(self) -> None:
        try:
            while self.open_readers or (self.lost and self.control is not None):
                self._serve_ready()
        except BaseException as exc:  # the main thread raises it: this worker ends with it
            self._error = exc
        finally:
            with self.cond:
                self._done = True
                self.cond.notify()

    def _serve_ready(self) -> None:
        watched = [*self.open_readers, *(a for a, reader in self.peer_alive.items() if reader in self.open_readers)]
        control = self.control
        ready: list[Any] = multiprocessing.connection.wait([*watched, *([control] if control else [])], PARENT_CHECK_INTERVAL_S)
        # The control pipe first: a warm pool's StartGPURun was sent before its run's batches.
        for reader in sorted(ready, key=lambda conn: conn is not control):
            if reader is control:
                self._serve_control()
            elif reader in self.peer_alive:
                batches = self.peer_alive[reader]
                if batches in self.open_readers and not batches.poll():
                    self.open_readers.remove(batches)  # the peer is gone; the main process reports it
                    self.lost.add(self.peer_of[batches])
            elif reader in self.senders:  # not a dead peer's pipe, closed by the replacement just taken
                self._serve_request(reader)

    def _serve_control(self) -> None:
        # Every message waiting: a run's EndGPURun may come just before the next one's StartGPURun.
        while self.control is not None:
            message = _read_control(self.control)
            if isinstance(message, (StartGPURun, EndGPURun)):
                self.run_in_main(message)
            else:
                peer = self._take_replacement(message)
                if peer is None:
                    self.control = None  # the main process is shutting down: lost peers stay lost
                    return
                self.lost.discard(peer)
            if not self.control.poll():
                return

    def _serve_request(self, reader: Any) -> None:
        try:
            message = loads_message(reader.recv_bytes())
        except EOFError:  # the peer died (a normal end says NoMoreBatches first)
            self.open_readers.remove(reader)
            self.lost.add(self.peer_of[reader])
            return
        if isinstance(message, NoMoreBatches):
            self.open_readers.remove(reader)
            return
        sender = self.senders[reader]
        runner = runner_of(self.runners, message)
        if runner is None:  # its run's StartGPURun failed to load (the run reports it)
            error = RuntimeError(f"{self.where} has no forward for stage {message.stage}: the stream's models failed to load")
            sender.queue.put(ForwardFailed(message.batch_id, ExceptionWithTraceback(error, self.where)))
            tensor_transport.discard(message.batch)
            return
        try:
            # The batch's shared-memory segments are unlinked here, read or not (see .tensor_transport).
            uploaded = runner.upload(tensor_transport.unpack(message.batch))
        except Exception as exc:
            sender.queue.put(ForwardFailed(message.batch_id, ExceptionWithTraceback(exc, f"{self.where}, {runner.stage}")))
            return
        with self.cond:
            self.uploaded.append((sender, message, uploaded))
            self.cond.notify()

    def _take_replacement(self, message: Optional[Any]) -> Optional[int]:
        """Reads the descriptors that follow ``message`` (a ``PeerReplaced``) on the control pipe;
        serves the new peer. Returns the peer's index, or None when the control pipe is closed."""
        if message is None:
            return None
        try:
            with socket.fromfd(self.control.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                batch_fd, output_fd, alive_fd = reduction.recvfds(sock, 3)
        except (EOFError, OSError):
            return None
        assert isinstance(message, PeerReplaced), message
        for reader in [r for r, peer in self.peer_of.items() if peer == message.peer]:
            if reader in self.open_readers:
                self.open_readers.remove(reader)
            for alive in [a for a, r in self.peer_alive.items() if r is reader]:
                del self.peer_alive[alive]
                alive.close()
            self.senders.pop(reader).close(timeout=PARENT_CHECK_INTERVAL_S)
            del self.peer_of[reader]
            reader.close()
        batches = Connection(batch_fd, writable=False)
        self.senders[batches] = self.make_sender(message.peer, Connection(output_fd, readable=False))
        self.peer_alive[Connection(alive_fd, writable=False)] = batches
        self.peer_of[batches] = message.peer
        self.open_readers.append(batches)
        return message.peer


def _read_control(control: Any) -> Optional[Any]:
    """The next message on the control pipe (``PeerReplaced``, ``StartGPURun``, ``EndGPURun``); None once it is closed."""
    try:
        return loads_message(control.recv_bytes())
    except (EOFError, OSError):
        return None
