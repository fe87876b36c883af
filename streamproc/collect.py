"""``sp.collect_stats()``: the :class:`RunStats` of every run finished inside a ``with`` block.

Runs in the main process. The only state is a :class:`contextvars.ContextVar` holding the
collectors of the current context: a run records its stats into every collector open around
it (nested blocks both see it). Threads started inside the block do not inherit a context
variable (asyncio tasks and ``contextvars.copy_context().run`` do), so a run in another
thread is collected only if that thread opened its own block; a collector shared between
threads takes runs under a lock.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .stats import RunStats

if TYPE_CHECKING:
    import pandas

    from .bottleneck import Bottleneck
    from .plan import Plan

_collectors: contextvars.ContextVar[tuple[StatsCollector, ...]] = contextvars.ContextVar(
    "streamproc_stats_collectors", default=()
)


class StatsCollector:
    """The runs finished inside a :func:`collect_stats` block; the last one's report and hint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: list[RunStats] = []

    @property
    def runs(self) -> list[RunStats]:
        """A :class:`RunStats` per run finished so far, in the order they finished."""
        with self._lock:
            return list(self._runs)

    def _add(self, stats: RunStats) -> None:
        with self._lock:
            self._runs.append(stats)

    def _last(self) -> RunStats:
        runs = self.runs
        if not runs:
            raise ValueError("collect_stats: no run has finished inside this block yet")
        return runs[-1]

    @property
    def bottleneck(self) -> Bottleneck:
        """The last run's :class:`~streamproc.bottleneck.Bottleneck`."""
        return self._last().bottleneck

    def report(self) -> str:
        """The last run's report (see :meth:`RunStats.report`)."""
        return self._last().report()

    def to_dict(self) -> dict[str, Any]:
        return self._last().to_dict()

    def to_pandas(self) -> pandas.DataFrame:
        return self._last().to_pandas()

    def __str__(self) -> str:
        runs = self.runs
        return runs[-1].report() if runs else "streamproc: no run finished inside collect_stats()"


@contextmanager
def collect_stats() -> Iterator[StatsCollector]:
    """Collects the stats of every run finished in this block (main process).

    >>> import streamproc as sp
    >>> with sp.collect_stats() as stats:
    ...     _ = sp.from_iterable(range(10)).map(abs).to_list()
    >>> stats.runs[0].records_out
    10
    """
    collector = StatsCollector()
    token = _collectors.set((*_collectors.get(), collector))
    try:
        yield collector
    finally:
        _collectors.reset(token)


def publish_run(stats: RunStats, plan: Plan, in_workers: bool = False) -> None:
    """A run ended: record it in the open collectors, and print its report if ``show_stats``.

    The report goes to the ``streamproc`` logger (level INFO) when logging is configured (a
    handler on it or the root logger, enabled for INFO), else to stderr.
    """
    stats.deterministic = plan.options.deterministic
    stats.writes_in_workers = in_workers
    if 0 in stats.stages:  # named here: a worker's copy of the source may not describe it (an iterable)
        stats.stages[0].name = f"read {plan.source.describe()}"
    for collector in _collectors.get():
        collector._add(stats)
    if plan.options.show_stats:
        _show(stats.report())


def _show(report: str) -> None:
    import logging  # here: importing logging costs a run that does not show stats ~20 ms

    logger = logging.getLogger("streamproc")
    # show_stats=True asks for the report: a logger configured above INFO does not swallow it.
    if logger.hasHandlers() and logger.isEnabledFor(logging.INFO):
        logger.info("%s", report)
    else:
        sys.stderr.write(report + "\n")
