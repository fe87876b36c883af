"""The contract between a run and a warm pool that lends it its processes (main process)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

if TYPE_CHECKING:
    from .run import _Run


class RunLease(Protocol):
    """A warm pool's hold on a run (:mod:`streamproc.service.pool`): the run's processes are the pool's.

    ``begin`` (main process, as the run starts) waits for the pool, sets ``run.pool`` and sends
    the GPU workers the run's forwards; ``end`` (in :meth:`_Run.shutdown`) drains the run
    instead of stopping the workers, replaces dead ones and frees the pool. A run without a
    lease starts and stops its pool itself.
    """

    def begin(self, run: _Run, forwards_bytes: Optional[bytes]) -> None: ...

    def end(self, run: _Run, broken: bool) -> None: ...
