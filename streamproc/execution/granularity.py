"""Task granularity: finer tasks for a small known-length input, so no worker idles at the end.

A pure function of the input's size (main process, when the plan is built): never of timing
or of the number of workers, so every backend, worker count, resumed run and shard sees the
same tasks (design.md section 5, part layout).

With ``task_size`` records per task, an input of a few tasks leaves a worker idle while the
last long task runs elsewhere (4 tasks of 1,024 documents on 2 workers: whichever worker
started later finishes alone). :func:`finer_task_size` cuts such an input into at least
:data:`MIN_TASKS_PER_RUN` tasks, never below :data:`MIN_TASK_RECORDS` records (a task's fixed
cost must stay small next to its work), and in whole batches of the plan's largest
record-count batch size, so that every batch but the input's last stays full.
"""

from __future__ import annotations

from typing import Optional

#: An input that allows it is cut into at least this many tasks (without ``task_size`` set).
MIN_TASKS_PER_RUN = 8
#: ... but no task is cut below this many records.
MIN_TASK_RECORDS = 256


def finer_task_size(task_size: int, num_records: Optional[int], batch_records: int = 1) -> int:
    """The task size to use for an input of ``num_records`` (None: unknown) (main process).

    ``task_size`` is the default one (an upper bound); ``batch_records`` the largest batch
    size in records of the plan's batched ops (1: none), a multiple of which the result is.

    >>> finer_task_size(1024, 4096, batch_records=64)
    512
    >>> finer_task_size(1024, 1_000_000), finer_task_size(1024, None), finer_task_size(1024, 300)
    (1024, 1024, 1024)
    >>> finer_task_size(1024, 3000, batch_records=100)
    400

    An input too small for :data:`MIN_TASKS_PER_RUN` tasks of :data:`MIN_TASK_RECORDS` gets
    tasks of :data:`MIN_TASK_RECORDS` (rounded up to whole batches), still at most
    ``task_size``; one of ``task_size`` records or fewer stays one task.
    """
    if num_records is None or num_records <= task_size:
        return task_size
    unit = max(1, batch_records)
    wanted = max(MIN_TASK_RECORDS, -(-num_records // MIN_TASKS_PER_RUN))
    wanted = -(-wanted // unit) * unit
    return min(task_size, wanted)
