"""SIGTERM during ``write_parquet`` (a Slurm time limit, a preemption): commit, then exit cleanly.

While a write runs in the main thread, :func:`sigterm_stops_the_run` makes SIGTERM raise
:class:`RunTerminated` (a ``KeyboardInterrupt``) there, so the run takes its normal abort
path: the backend stops its workers, the sink drops the part in progress, and the parts
committed so far stay listed in the manifest. Then, if SIGTERM's handler was the default one
(the process would have died), the process exits with status ``128 + SIGTERM`` (143, what a
scheduler expects) via ``SystemExit``; otherwise the previous Python handler is called and the
``RunTerminated`` goes on. The previous handler is restored after the run either way. A rerun
with ``resume=True`` completes the job. Runs in the main process.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class RunTerminated(KeyboardInterrupt):
    """SIGTERM stopped a ``write_parquet``; its committed parts stay (resume with ``resume=True``)."""


@contextmanager
def _sigterm_raises() -> Iterator[list[Any]]:
    """Installs the handler; yields ``[previous handler]`` plus a flag appended once SIGTERM came."""
    state: list[Any] = [signal.getsignal(signal.SIGTERM)]
    owner = os.getpid()

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            # A worker forked during the run inherited this handler: it must die of SIGTERM as
            # before (the pool's terminate() counts on it), not raise in its own loop.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if len(state) > 1:
            return  # already stopping: let the abort path finish
        state.append(True)
        raise RunTerminated("streamproc: SIGTERM received during write_parquet")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, state[0])


def run_until_sigterm(run: Callable[[], T], what: str) -> T:
    """Calls ``run()`` with SIGTERM turned into :class:`RunTerminated` (see the module docstring).

    Outside the main thread (no handler can be installed there) and when SIGTERM is ignored,
    ``run()`` is called as is.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        return run()
    with _sigterm_raises() as state:
        try:
            return run()
        except BaseException as exc:
            if len(state) == 1:
                raise  # not a SIGTERM, whatever it was
            terminated = exc
    previous = state[0]
    warnings.warn(
        f"streamproc: SIGTERM stopped {what}; the parts committed so far stay: rerun with resume=True to complete it",
        RuntimeWarning,
        stacklevel=3,
    )
    if previous in (signal.SIG_DFL, None):
        raise SystemExit(128 + signal.SIGTERM) from terminated
    if callable(previous):
        previous(signal.SIGTERM, None)
    raise terminated
