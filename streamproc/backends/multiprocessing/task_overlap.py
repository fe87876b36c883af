"""No drain between tasks: a CPU worker starts its next task while the current one waits for
its last GPU batches (issue 10, item 4).

Runs in a CPU worker. Without it, a task's last batches are awaited before the worker reads
its next task, so its GPU workers idle for the round trip plus the next task's first prepare.
With it, when a task has sent every batch of the plan's last ``map_gpu`` stage and only
waits for answers (``RemoteForwardRunner.run`` calls :meth:`TaskOverlap.start_next`), the
worker reads its task pipe without blocking, and keeps watching it while it waits
(``GPUClient.wait_outputs(draining=True)``); if the next message is a task of the same run,
that task starts at once in thread ``streamproc-cpu-<i>-task-<k>``: it reads its records,
prepares its first batches and sends them, while the ending task waits for its answers
(``Connection.wait`` releases the GIL) and postprocesses them. Every batch of task k is thus
sent before task k+1's first: the GPU worker, which serves a pipe in order, never makes the
ending task wait behind the next one. A task started ahead times itself (``TaskTurn.ahead``).

Invariants (``k`` ends before ``k+1`` says anything):

* ``tasks running in a worker <= tasks the main process has in flight there`` (2, see
  ``MAX_TASKS_IN_FLIGHT_PER_WORKER``): a task starts its successor at most once, only once it
  has no batch left to send for the stage that drained, and only a task already sent;
* the messages of task ``k+1`` to the main process wait until task ``k`` sent its last one
  (:meth:`TaskTurn.send`): the result pipe carries each task's messages together, in the order
  the tasks came, as without overlap; an error raised in ``k+1`` while ``k`` ends is its own
  (``TaskFailed(k+1)`` after ``k``'s last chunk);
* the worker's main loop handles every message in the order it was sent: a message read ahead
  that is not a task of this run (``EndRun``, ``Stop``, an ``IsolatedTask``) waits in the
  queue, and nothing is read behind it.

A run overlaps only where nothing else holds per-task state of the worker: not with
``on_error`` other than ``"raise"`` (the context's error policy is the running task's), a
``gpu_memory_budget`` (phases: see :class:`~streamproc.gpu.forward.PhasedForwardRunner`),
``task_timeout`` (the watchdog follows one thread), workers' own part files, or runs that
replace dead workers (a crash is then blamed on exactly the task that ran).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any, Optional, Union

from ...execution.serialization import loads_message
from ...execution.task import Task
from .messages import WorkerId

#: Off: each task's batches are awaited before the next task starts, as before issue 10
#: (benchmarks/bench_device_busy.py compares the two; a worker reads it when a task drains).
OVERLAP_TASKS = True
#: How often a thread waiting for its turn, or the main loop waiting for a task's thread,
#: wakes up; the watchdog thread ends the process if the main process dies meanwhile.
TURN_WAIT_S = 1.0


#: Read ahead in place of a message: the task pipe was closed (the main process shuts down).
_PIPE_CLOSED = object()


class TaskTurn:
    """One task's place in the worker's order: it may send once ``previous_done`` is set.

    ``done`` is set when the task has sent its last message (or failed to), whatever happens.
    """

    def __init__(self, previous_done: Optional[threading.Event]) -> None:
        self.previous_done = previous_done
        #: Started while the task before it ran: it times itself (a timer of its own, whose
        #: figures go with its last chunk), as the worker's summing timer serves one task at a time.
        self.ahead = previous_done is not None
        self.done = threading.Event()
        self.next_started = False

    def send(self, send: Callable[[Any], None], message: Any) -> None:
        """Sends ``message`` with ``send`` once the task before this one has sent its last."""
        previous = self.previous_done
        if previous is not None:
            while not previous.wait(TURN_WAIT_S):
                pass  # the task before ends or fails; either sets the event (see TaskRunner.run)
            self.previous_done = None
        send(message)


class AheadTask:
    """A task started early in its own thread; the main loop :meth:`join`\\ s it in its turn."""

    def __init__(self, name: str, target: Callable[[], None]) -> None:
        self.error: Optional[BaseException] = None
        self._target = target
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # sys.exit() in user code, a broken pipe: the main loop re-raises it
            self.error = exc

    def join(self) -> None:
        """Waits for the task to end (main loop); re-raises what ended its thread."""
        while self.thread.is_alive():
            self.thread.join(TURN_WAIT_S)
        error, self.error = self.error, None
        if error is not None:
            raise error


class TaskOverlap:
    """Reads tasks ahead at a task's drain point and runs them in order (see the module docstring).

    Args:
        worker: the CPU worker.
        task_conn: its task pipe (read here only while no other thread reads it).
        run_task: runs one task message in the given turn, sending with ``turn.send``.
    """

    def __init__(self, worker: WorkerId, task_conn: Any, run_task: Callable[[Any, TaskTurn], None]) -> None:
        self.worker = worker
        self.task_conn = task_conn
        self._run_task = run_task
        #: The run whose tasks may overlap (None: overlap is off for the run in progress).
        self.run_id: Optional[int] = None
        self._ahead: collections.deque[Union[AheadTask, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._local = threading.local()

    def next_message(self, receive: Callable[[], Any]) -> Union[AheadTask, Any]:
        """The next message for the main loop: one read ahead (or a started task), else ``receive()``."""
        with self._lock:
            if self._ahead:
                item = self._ahead.popleft()
                if item is _PIPE_CLOSED:
                    raise EOFError("the task pipe was closed")
                return item
        return receive()

    def run(self, message: Any, previous_done: Optional[threading.Event] = None) -> None:
        """Runs a task message in this thread, in its turn after ``previous_done``."""
        turn = TaskTurn(previous_done)
        self._local.turn = turn
        try:
            self._run_task(message, turn)
        finally:
            self._local.turn = None
            turn.done.set()

    def wants_next(self) -> bool:
        """Whether the task running in this thread may still start the next one (it has not yet)."""
        turn: Optional[TaskTurn] = getattr(self._local, "turn", None)
        return OVERLAP_TASKS and self.run_id is not None and turn is not None and not turn.next_started

    def start_next(self) -> None:
        """At a drain point of the task running in this thread: start the next task if it is there.

        Runs in the thread of the task that drains (``GPUClient.before_drain``). Never blocks
        on the task pipe: a task the main process has not sent yet is read by the main loop.
        """
        turn: Optional[TaskTurn] = getattr(self._local, "turn", None)
        if not OVERLAP_TASKS or self.run_id is None or turn is None or turn.next_started:
            return
        with self._lock:
            if any(not isinstance(item, AheadTask) for item in self._ahead):
                turn.next_started = True  # a message waits for the main loop: nothing is read behind it
                return
            try:
                if not self.task_conn.poll():
                    return  # the wait for this task's answers watches the pipe (GPUClient.wait_outputs)
                turn.next_started = True
                message = loads_message(self.task_conn.recv_bytes())
            except (EOFError, OSError):
                turn.next_started = True
                self._ahead.append(_PIPE_CLOSED)  # the main loop ends as when it reads the EOF itself
                return
            if type(message) is not Task or message.run_id != self.run_id:
                self._ahead.append(message)  # the main loop handles it after the running task
                return
            done = turn.done
            self._ahead.append(
                AheadTask(f"streamproc-cpu-{self.worker.index}-task-{message.index}", lambda: self.run(message, done))
            )
