"""The stuck-task watchdog of a CPU worker (``set_processing(task_timeout=s)``).

Runs in a CPU worker, in thread ``streamproc-cpu-<i>-task-watchdog``. It costs nothing per
record: the thread samples the stack of the thread running the task a few times per
``task_timeout`` and calls it *progress* when the call that processes a record or a batch
changed since the last sample (see :func:`progress_signature`). When a task makes no
progress for ``task_timeout`` seconds, it sends ``TaskStuck`` (stage, record in isolation,
the Python stack) to the main process, which raises ``TaskTimeoutError`` or isolates the task.

Each progress also goes to a shared double (``time.monotonic()``, one clock for every process
of the machine): the main process's backstop (see :mod:`.retries`) kills a worker whose task
made no progress for longer than ``task_timeout`` plus a grace even when this thread cannot run
(a C extension holding the GIL).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any, Optional

from ...stage_tags import stage_running_in
from .messages import TaskStuck, WorkerId

#: Samples of the task's stack per ``task_timeout`` (and at least this often: 1 s).
SAMPLES_PER_TIMEOUT = 4
MAX_SAMPLE_INTERVAL_S = 1.0

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_STDLIB_DIRS = tuple({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]})
#: Locals of a streamproc frame that hold the unit of work it is on (an op's chunk or batch).
_WORK_LOCALS = ("chunk", "batch", "records", "batch_id")


def _is_streamproc(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(_PACKAGE_DIR)


def _is_stdlib(frame: FrameType) -> bool:
    name = frame.f_code.co_filename
    return name.startswith("<") or (name.startswith(_STDLIB_DIRS) and "site-packages" not in name)


def progress_signature(frame: Optional[FrameType]) -> tuple[Any, ...]:
    """What changes when the task finishes a record or a batch (compared by identity).

    The innermost streamproc frame (an op's loop over its chunks, the wait for a GPU
    worker's answer to one batch), the chunk or batch it holds (its locals), and the user
    call it made (a new frame per record for ``map``, per batch for ``map_batches``); frames
    of the standard library inside it (``Event.wait``, ``Connection.wait`` with a timeout)
    are left out, so a wait that wakes up every second is no progress.
    """
    inner: Optional[FrameType] = None
    while frame is not None and not _is_streamproc(frame):
        inner = frame
        frame = frame.f_back
    if frame is None:
        return ()
    # The user call made by that frame: the outermost non-streamproc frame inside it.
    user = inner if inner is not None and not _is_stdlib(inner) else None
    work = frame.f_locals
    return (frame, user, *(work.get(name) for name in _WORK_LOCALS))


#: Where a worker's own stack starts (a forked worker's stack also shows its parent's frames).
WORKER_ENTRY_POINTS = frozenset({"run_cpu_worker", "run_gpu_worker"})


def _format_worker_stack(frame: FrameType) -> str:
    summary = traceback.extract_stack(frame)
    start = next((i for i, entry in enumerate(summary) if entry.name in WORKER_ENTRY_POINTS), 0)
    return "".join(traceback.format_list(summary[start:]))


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class TaskWatchdog:
    """Watches the task that thread ``thread_id`` runs; see the module docstring.

    ``send(message)`` sends ``TaskStuck`` to the main process (it must not block for long).
    ``progress`` is the shared double of this worker index (None: no backstop).
    """

    def __init__(
        self,
        worker: WorkerId,
        timeout_s: float,
        send: Callable[[Any], None],
        progress: Any = None,
        thread_id: Optional[int] = None,
    ) -> None:
        self.worker = worker
        self.timeout_s = timeout_s
        self._send = send
        self._progress = progress
        self._thread_id = thread_id if thread_id is not None else threading.get_ident()
        self._task: Optional[tuple[int, int]] = None  # (run_id, task_index)
        self._row: Optional[int] = None
        #: Set while the task thread waits for the main process to read its results.
        self.sending = False
        self._stop = threading.Event()
        interval = min(MAX_SAMPLE_INTERVAL_S, timeout_s / SAMPLES_PER_TIMEOUT)
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name=f"streamproc-{worker.kind}-{worker.index}-task-watchdog", daemon=True
        )
        self._publish(time.monotonic())
        self._thread.start()

    def begin_task(self, run_id: int, task_index: int) -> None:
        self._row = None
        self._task = (run_id, task_index)

    def begin_record(self, row: int) -> None:
        self._row = row

    def end_task(self) -> None:
        self._task = None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(MAX_SAMPLE_INTERVAL_S * 2)

    def _publish(self, now: float) -> None:
        if self._progress is not None:
            self._progress.value = now

    def _run(self, interval: float) -> None:
        watched: Optional[tuple[int, int]] = None
        row: Optional[int] = None
        signature: tuple[Any, ...] = ()
        last_progress = time.monotonic()
        reported = False
        while not self._stop.wait(interval):
            now = time.monotonic()
            task, current_row = self._task, self._row
            frame = sys._current_frames().get(self._thread_id)
            current = progress_signature(frame)
            del frame
            if task is None or self.sending or task != watched or current_row != row or not _same(current, signature):
                watched, row, signature, last_progress, reported = task, current_row, current, now, False
                self._publish(now)
                continue
            if reported or now - last_progress < self.timeout_s:
                continue
            reported = True
            self._report(task, current_row, now - last_progress)

    def _report(self, task: tuple[int, int], row: Optional[int], seconds: float) -> None:
        thread = next((t for t in threading.enumerate() if t.ident == self._thread_id), None)
        frame = sys._current_frames().get(self._thread_id)
        stack = _format_worker_stack(frame) if frame is not None else "(no stack: the thread has ended)"
        stage = stage_running_in(thread) if thread is not None else "unknown"
        del frame
        try:
            self._send(TaskStuck(task[0], task[1], self.worker, os.getpid(), stage, row, seconds, stack))
        except OSError:  # the main process is gone or shutting down
            pass
