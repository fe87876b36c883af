"""The collector's wait: result pipes, process sentinels and a wakeup pipe, one poll object.

Runs in the main process: a run's collector (the sink's thread), and a warm pool's router thread
(``service/router.py``), each with its own. ``multiprocessing.connection.wait``
builds a new selector and registers every object on each call: 13 us for 5 objects here,
against 2 us for ``select()`` on a selector kept between calls. The collector waits once per
finished task or so (about 1,000 times per million tiny records), so :class:`ResultWaiter`
keeps one selector and rebuilds it only when the set of live workers changes (a worker
reaped or replaced: its :class:`~.pool.WorkerHandle` is a new object).
"""

from __future__ import annotations

import selectors
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from .pool import WorkerHandle

# What multiprocessing.connection.wait itself uses (poll(2) where there is one).
_Selector = selectors.PollSelector if hasattr(selectors, "PollSelector") else selectors.SelectSelector

#: What woke the collector: a worker's result pipe, a worker's sentinel (it ended), or the wakeup pipe.
Ready = tuple[str, Optional["WorkerHandle"]]


class ResultWaiter:
    """Waits until a live worker's result pipe is readable, a worker ends, or the wakeup pipe is written.

    Main process (the collector). :meth:`wait` returns ``("result", worker)``,
    ``("exited", worker)`` and ``("wakeup", None)`` entries, like
    ``multiprocessing.connection.wait`` over ``[result pipes, sentinels, wakeup]`` would, in
    that order of registration. Not thread-safe (only the collector waits). ``close()`` is
    idempotent.
    """

    def __init__(self, wakeup_reader: Any) -> None:
        self._wakeup_reader = wakeup_reader
        self._workers: tuple[WorkerHandle, ...] = ()
        self._selector: Optional[selectors.BaseSelector] = None

    def _selector_for(self, live: Sequence[WorkerHandle]) -> selectors.BaseSelector:
        selector = self._selector
        if selector is not None and len(live) == len(self._workers) and all(a is b for a, b in zip(live, self._workers)):
            return selector
        self.close()
        selector = _Selector()
        for worker in live:
            selector.register(worker.result_conn, selectors.EVENT_READ, ("result", worker))
            selector.register(worker.process.sentinel, selectors.EVENT_READ, ("exited", worker))
        selector.register(self._wakeup_reader, selectors.EVENT_READ, ("wakeup", None))
        self._selector, self._workers = selector, tuple(live)
        return selector

    def wait(self, live: Sequence[WorkerHandle], timeout_s: Union[float, None]) -> list[Ready]:
        """What is ready among ``live``'s pipes and sentinels and the wakeup pipe, within ``timeout_s``."""
        selector = self._selector_for(live)
        ready = [key.data for key, _ in selector.select(timeout_s)]
        if len(ready) > 1:  # the order connection.wait gives: results, then sentinels, then wakeup
            order = {"result": 0, "exited": 1, "wakeup": 2}
            ready.sort(key=lambda entry: order[entry[0]])
        return ready

    def close(self) -> None:
        """Drops the selector (the pipes and sentinels stay open: their owners close them)."""
        if self._selector is not None:
            self._selector.close()
            self._selector, self._workers = None, ()
