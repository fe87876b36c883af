"""Putting finished task outputs back in order (pure: no processes, no threads).

Workers finish tasks in any order. With ``deterministic=True`` the :class:`ReorderBuffer`
releases outputs strictly by task index, chunk by chunk, as soon as every earlier task is
complete; with ``deterministic=False`` it releases them as they arrive.

Memory invariant (deterministic): the buffered tasks are a subset of
``[next_task, next_task + window)``, because the dispatcher never hands out task
``k >= next_task + window`` (see :class:`~.dispatch.TaskDispatcher`). So at most ``window``
tasks' outputs are held here.

Bytes: :meth:`ReorderBuffer.add` takes each chunk's size (the multiprocessing backend: its
pickled message length, already known; the threads backend: an estimate), and
``buffered_bytes`` is the sum over the chunks held, which the dispatcher bounds (see NOTE
[ streamproc byte bounds ] in :mod:`.byte_budget`): ``buffered_bytes = sum(nbytes of the
chunks added and not yet popped)``.

Retries (``hold_tasks=True``, set when a task may be rerun after its worker died): a task's
chunks are released only once its last chunk has arrived, in either mode, so the sink never
sees part of a task that :meth:`ReorderBuffer.reset_task` may still discard. Without it, the
oldest unfinished task of a deterministic run streams chunk by chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Optional

from .task import TaskOutput


class _TaskOutputs:
    __slots__ = ("chunks", "complete", "error", "nbytes")

    def __init__(self) -> None:
        self.chunks: deque[TaskOutput] = deque()
        self.nbytes: deque[int] = deque()  # each chunk's size, alongside ``chunks``
        self.complete = False
        self.error: Optional[BaseException] = None


class ReorderBuffer:
    """Collects :class:`TaskOutput` s per task and releases them in order.

    >>> buf = ReorderBuffer(deterministic=True)
    >>> buf.add(TaskOutput(1, "b", 1))
    >>> list(buf.pop_ready())
    []
    >>> buf.add(TaskOutput(0, "a", 1))
    >>> [output.chunk for output in buf.pop_ready()]
    ['a', 'b']
    >>> buf.next_task, buf.tasks_done
    (2, 2)

    An error recorded for task ``k`` (``add_error``) is raised by ``pop_ready`` once the
    outputs of every task before ``k`` have been released (deterministic), or at once.
    """

    def __init__(self, deterministic: bool, hold_tasks: bool = False) -> None:
        self.deterministic = deterministic
        self.hold_tasks = hold_tasks
        self.next_task = 0
        self.tasks_done = 0
        self._tasks: dict[int, _TaskOutputs] = {}
        self._arrived: deque[TaskOutput] = deque()
        self._arrived_bytes: deque[int] = deque()
        self._error: Optional[BaseException] = None
        #: The sizes of the chunks held (added, not popped), summed.
        self.buffered_bytes = 0

    def _entry(self, task: int) -> _TaskOutputs:
        entry = self._tasks.get(task)
        if entry is None:
            entry = self._tasks[task] = _TaskOutputs()
        return entry

    def add(self, output: TaskOutput, nbytes: int = 0) -> None:
        """Takes the next chunk of task ``output.task_index`` (a task's chunks come in order),
        of ``nbytes`` bytes (what it counts towards ``buffered_bytes`` until popped)."""
        self.buffered_bytes += nbytes
        if self.deterministic:
            entry = self._entry(output.task_index)
            entry.chunks.append(output)
            entry.nbytes.append(nbytes)
            entry.complete = output.last
        elif self.hold_tasks:
            entry = self._entry(output.task_index)
            entry.chunks.append(output)
            entry.nbytes.append(nbytes)
            if output.last:
                del self._tasks[output.task_index]
                self._arrived.extend(entry.chunks)
                self._arrived_bytes.extend(entry.nbytes)
                self.tasks_done += 1
        else:
            self._arrived.append(output)
            self._arrived_bytes.append(nbytes)
            if output.last:
                self.tasks_done += 1

    def reset_task(self, task: int) -> None:
        """Discards what arrived of unfinished task ``task``: it runs again from its start.

        Only with ``hold_tasks``, which guarantees none of it was released.
        """
        assert self.hold_tasks, "reset_task needs hold_tasks=True"
        entry = self._tasks.get(task)
        if entry is not None:
            assert not entry.complete, f"task {task} is complete"
            entry.chunks.clear()
            self.buffered_bytes -= sum(entry.nbytes)
            entry.nbytes.clear()

    def add_error(self, task: int, error: BaseException) -> None:
        if self.deterministic:
            self._entry(task).error = error
        elif self._error is None:
            self._error = error

    @property
    def buffered_tasks(self) -> int:
        return len(self._tasks)

    def pop_ready(self) -> Iterator[TaskOutput]:
        """Yields the outputs that may be released now."""
        if not self.deterministic:
            while self._arrived:
                self.buffered_bytes -= self._arrived_bytes.popleft()
                yield self._arrived.popleft()
            if self._error is not None:
                raise self._error
            return
        while True:
            entry = self._tasks.get(self.next_task)
            if entry is None:
                return
            if self.hold_tasks and not entry.complete and entry.error is None:
                return
            while entry.chunks:
                self.buffered_bytes -= entry.nbytes.popleft()
                yield entry.chunks.popleft()
            if entry.error is not None:
                raise entry.error
            if not entry.complete:
                return
            del self._tasks[self.next_task]
            self.next_task += 1
            self.tasks_done += 1
