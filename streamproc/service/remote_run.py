"""One client's run inside the service (server process): the plan on the warm pool, outputs sent back.

Runs in the server process, one connection handler thread per run (plus the reader thread
below and the run's own feeders). The client sent its plan as the workers receive it; the
server runs it with the multiprocessing backend on its :class:`~streamproc.WorkerPool`
(``pool=``), exactly as a stream of this process would run, except for two seams:

* the source is a :class:`_ClientFedSource`: its tasks' payloads come from the client (one
  per :class:`~.protocol.PayloadsWanted` credit), its records are read by the original
  source's ``read_task`` in the workers. So a source over files (parquet, jsonl: payloads
  name a file and a row group or lines) is read by the server's workers, and an in-memory
  iterable's records (its payloads) are streamed from the client;
* the sink is a :class:`_RelaySink`: its finalizer is the client sink's, and each
  :class:`~streamproc.execution.task.TaskOutput` goes back to the client in an
  :class:`~.protocol.Output`, at most ``OUTPUT_WINDOW`` un-acked.

The client's ``Cancel``, or the end of its connection (a client killed, a lost network),
cancels the run: the source raises :class:`RunCancelled` in the feeder, the handler closes
the run handle, and the pool drains the run (its workers go back to the pool).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional

from ..errors import ExceptionWithTraceback
from ..execution.serialization import dill_loads
from ..io.base import Source
from ..io.sinks import Sink
from . import protocol

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from ..execution.task import TaskOutput
    from ..plan import Plan
    from .pool import WorkerPool

logger = logging.getLogger("streamproc.service")

#: Payloads asked of the client ahead of the feeder (the run's own dispatch window bounds the rest).
PAYLOAD_WINDOW = 4
#: How long the reader waits for the client's request after the handshake.
REQUEST_TIMEOUT_S = 30.0
#: A bound on every wait of the run's threads, between checks of the cancel flag.
CANCEL_POLL_S = 0.5


class RunCancelled(Exception):
    """The client cancelled the run or went away (raised in the server's feeder, never sent)."""


_END = object()


class _ClientFeed:
    """The payloads the client sent and the credits it is owed (server process; thread-safe)."""

    def __init__(self, conn: Connection, send_lock: threading.Lock) -> None:
        self.conn = conn
        self.send_lock = send_lock
        self.items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.cancelled = threading.Event()

    def want(self, count: int) -> None:
        try:
            with self.send_lock:
                protocol.send(self.conn, protocol.PayloadsWanted(count))
        except OSError:
            self.cancel()

    def cancel(self) -> None:
        self.cancelled.set()
        self.items.put(RunCancelled("the client cancelled the run or disconnected"))

    def next_item(self) -> Any:
        while True:
            try:
                return self.items.get(timeout=CANCEL_POLL_S)
            except queue.Empty:
                if self.cancelled.is_set():
                    raise RunCancelled("the client cancelled the run or disconnected") from None


class _ClientFedSource(Source):
    """The client's source with its task payloads streamed from the client.

    ``iter_tasks`` runs in the server's feeder thread; every other method is the original
    source's, wherever it runs (its pickled copy, which holds no records of an iterable, goes
    to the workers; the feed stays in the server process).
    """

    def __init__(self, inner: Source, feed: Optional[_ClientFeed]) -> None:
        self.inner = inner
        self.feed = feed

    def iter_tasks(self, task_size: int) -> Iterator[Any]:
        feed = self.feed
        assert feed is not None, "iter_tasks runs in the server process"
        feed.want(PAYLOAD_WINDOW)
        while True:
            item = feed.next_item()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            feed.want(1)
            yield None if item.skipped else item.payload

    def read_task(self, payload: Any) -> Iterator[Any]:
        return self.inner.read_task(payload)

    def read_task_chunks(self, payload: Any, chunk_size: int) -> Iterator[list[Any]]:
        return self.inner.read_task_chunks(payload, chunk_size)

    def locate(self, payload: Any, row: Optional[int] = None) -> str:
        return self.inner.locate(payload, row)

    def describe(self) -> str:
        return self.inner.describe()

    def __getstate__(self) -> dict[str, Any]:
        return {"inner": self.inner, "feed": None}


class _RelaySink(Sink):
    """The client sink's finalizer, run in the server's workers; outputs are read from the handle."""

    def __init__(self, finalize: Any) -> None:
        self._finalize = finalize

    def finalizer(self) -> Any:
        return self._finalize

    def write(self, output: TaskOutput) -> None:  # never called: serve_run reads the handle
        raise AssertionError("the service reads outputs from the run handle")


class _OutputWindow:
    """Outputs sent and not acked; invariant: ``sent - acked <= OUTPUT_WINDOW`` (server process)."""

    def __init__(self, cancelled: threading.Event) -> None:
        self._free = threading.Semaphore(protocol.OUTPUT_WINDOW)
        self._cancelled = cancelled

    def reserve(self) -> bool:
        """Waits for room; False if the run was cancelled meanwhile."""
        while not self._free.acquire(timeout=CANCEL_POLL_S):
            if self._cancelled.is_set():
                return False
        return not self._cancelled.is_set()

    def acked(self, count: int) -> None:
        for _ in range(count):
            self._free.release()


def read_client_messages(conn: Connection, feed: _ClientFeed, window: _OutputWindow) -> None:
    """The connection's reader thread (server process): payloads to the feed, acks to the window.

    Protocol: :class:`~.protocol.Payload` / ``PayloadsEnd`` / ``SourceFailed`` go to the feed,
    ``OutputsAcked`` frees window; ``Cancel``, an unreadable message or the end of the
    connection cancels the run.
    """
    while not feed.cancelled.is_set():
        try:
            message = protocol.recv(conn)
        except Exception:  # EOFError, OSError: the client is gone; anything else: a broken client
            feed.cancel()
            return
        if isinstance(message, protocol.Payload):
            feed.items.put(message)
        elif isinstance(message, protocol.PayloadsEnd):
            feed.items.put(_END)
        elif isinstance(message, protocol.SourceFailed):
            feed.items.put(message.error)  # unpickled: the client source's own exception
        elif isinstance(message, protocol.OutputsAcked):
            window.acked(message.count)
        else:  # Cancel, or nothing this protocol knows
            feed.cancel()
            return


def serve_run(
    conn: Connection,
    send_lock: threading.Lock,
    pool: WorkerPool,
    where: str,
    on_plan: Callable[[Plan, str], None] = lambda plan, client: None,
) -> str:
    """Runs the client's stream on ``pool`` and sends its outputs (server process, handler thread).

    Returns how the run ended: ``"done"``, ``"failed"`` (the error went to the client) or
    ``"cancelled"``. ``on_plan`` sees the plan and the client's name before it runs (the server notes its models).
    """
    from ..backends.multiprocessing.backend import MultiprocessingBackend

    if not conn.poll(REQUEST_TIMEOUT_S):
        raise TimeoutError(f"no run request within {REQUEST_TIMEOUT_S:.0f} s")
    request = protocol.recv(conn)
    if not isinstance(request, protocol.RunRequest):
        raise ValueError(f"expected a RunRequest, got {type(request).__name__}")
    feed = _ClientFeed(conn, send_lock)
    window = _OutputWindow(feed.cancelled)
    reader = threading.Thread(
        target=read_client_messages, args=(conn, feed, window), name="streamproc-service-reader", daemon=True
    )
    reader.start()
    try:
        try:
            client_plan, finalize = dill_loads(request.plan_bytes)
            plan = dataclasses.replace(
                client_plan,
                source=_ClientFedSource(client_plan.source, feed),
                options=dataclasses.replace(client_plan.options, pool=pool, show_progress=False, show_stats=False),
            )
            on_plan(plan, request.client)
            with MultiprocessingBackend().run(plan, _RelaySink(finalize)) as handle:
                for output in handle:
                    if not window.reserve():
                        return "cancelled"
                    with send_lock:
                        protocol.send(conn, protocol.Output(output))
            with send_lock:
                protocol.send(conn, protocol.RunDone(handle.stats))
            return "done"
        except BaseException as exc:
            if feed.cancelled.is_set():
                return "cancelled"
            try:
                with send_lock:
                    protocol.send(conn, protocol.RunFailed(ExceptionWithTraceback(exc, where)))
            except OSError:  # the client went away meanwhile
                return "cancelled"
            if not isinstance(exc, Exception):
                raise
            return "failed"
    finally:
        feed.cancel()
        # Closing the descriptor under a reader blocked in recv() would not wake it (and the
        # number could be reused by the next connection): shut the socket down first.
        shutdown_socket(conn)
        reader.join(CANCEL_POLL_S * 4)
        conn.close()


def shutdown_socket(conn: Connection) -> None:
    """Ends both directions of ``conn``'s socket (a thread blocked reading it gets EOF); keeps the descriptor."""
    try:
        sock = socket.socket(fileno=conn.fileno())
    except OSError:  # already closed
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()
