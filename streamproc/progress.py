"""Progress of a run (main process): a tqdm bar on a terminal or in a notebook, log lines elsewhere.

What is counted: **source records read** (``TaskOutput.source_records``, counted where each task
runs, before any op), because that is what a source knows the size of
(:meth:`~streamproc.io.base.Source.num_records`): with a filter, a ``flatten`` or a
``map_batches`` that changes the number of records, the outputs would never reach the total.
The output count is shown beside it (``out=...``). The total is known when the source knows its
size and the run does every task (no resume or shard selection); otherwise the bar shows a
count and a rate, without a total or an ETA.

Where it goes:

* stderr is a terminal, or the run is in a Jupyter kernel: one ``tqdm.auto`` bar (a widget in
  notebooks), redrawn in place;
* otherwise (a Slurm or batch log, a pipe): an INFO line of the ``"streamproc"`` logger every
  ``LOG_INTERVAL_S`` seconds (``STREAMPROC_PROGRESS_INTERVAL_S`` overrides it) and one at the
  end, giving records, rate and ETA. When that logger would drop INFO records (logging not
  configured, or configured at WARNING), the lines are written to stderr instead, so that
  ``show_progress=True`` always shows something.

The bar's postfix (and each log line) can also name the stage that currently limits the run:
pass ``stage_hint``, a callable returning that stage's name or None. The stats issue plugs its
bottleneck estimate in there (:func:`streamproc.io.sinks.progress_for`); it is called at most
once per ``HINT_INTERVAL_S``.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Optional, Protocol

if TYPE_CHECKING:
    from .execution.task import TaskOutput

#: Seconds between two progress lines when stderr is not a terminal.
LOG_INTERVAL_S = 30.0
#: Environment variable overriding :data:`LOG_INTERVAL_S` (seconds, a float >= 0).
LOG_INTERVAL_ENV = "STREAMPROC_PROGRESS_INTERVAL_S"
#: The most often ``stage_hint`` is called.
HINT_INTERVAL_S = 1.0

#: The name of the stage that currently limits the run, or None (see the module docstring).
StageHint = Callable[[], Optional[str]]

logger = logging.getLogger("streamproc")


class _Reporter(Protocol):
    def advance(self, source_records: int, outputs: int) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


def log_interval_s(environ: Optional[dict[str, str]] = None) -> float:
    """:data:`LOG_INTERVAL_S`, or the value of ``STREAMPROC_PROGRESS_INTERVAL_S``.

    Raises:
        ValueError: the variable is set to something other than a number >= 0.
    """
    text = (os.environ if environ is None else environ).get(LOG_INTERVAL_ENV)
    if text is None or not text.strip():
        return LOG_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise ValueError(f"{LOG_INTERVAL_ENV}={text!r}: expected a number of seconds >= 0, e.g. 60")
    return value


def stderr_is_interactive() -> bool:
    """Whether a redrawn bar reads well: stderr is a terminal, or we run in a Jupyter kernel."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or exotic stderr
        pass
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython  # type: ignore[attr-defined]
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def format_duration(seconds: float) -> str:
    """``H:MM:SS``.

    >>> format_duration(73.4), format_duration(3 * 3600 + 5)
    ('0:01:13', '3:00:05')
    """
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def progress_line(read: int, total: Optional[int], elapsed_s: float, outputs: int, stage: Optional[str] = None) -> str:
    """The text of one progress log line.

    >>> progress_line(250, 1000, 10.0, 240)
    'progress: 250/1,000 records (25.0%), 25.0 records/s, ETA 0:00:30, out=240'
    >>> progress_line(250, None, 10.0, 240, stage="stage 1 (map(clean))")
    'progress: 250 records, 25.0 records/s, out=240, bottleneck: stage 1 (map(clean))'
    """
    rate = read / elapsed_s if elapsed_s > 0 else 0.0
    if total is not None:
        share = 100.0 * read / total if total else 100.0
        eta = format_duration((total - read) / rate) if rate > 0 and read < total else ("0:00:00" if read >= total else "?")
        text = f"progress: {read:,}/{total:,} records ({share:.1f}%), {rate:,.1f} records/s, ETA {eta}, out={outputs:,}"
    else:
        text = f"progress: {read:,} records, {rate:,.1f} records/s, out={outputs:,}"
    return text + (f", bottleneck: {stage}" if stage else "")


def done_line(read: int, elapsed_s: float, outputs: int) -> str:
    """The last log line of a run.

    >>> done_line(1000, 40.0, 990)
    'done: 1,000 records read in 0:00:40 (25.0 records/s), 990 out'
    """
    rate = read / elapsed_s if elapsed_s > 0 else 0.0
    return f"done: {read:,} records read in {format_duration(elapsed_s)} ({rate:,.1f} records/s), {outputs:,} out"


class _Hint:
    """Calls ``stage_hint`` at most once per :data:`HINT_INTERVAL_S`; remembers the last answer."""

    def __init__(self, stage_hint: Optional[StageHint], clock: Callable[[], float]) -> None:
        self.stage_hint = stage_hint
        self.clock = clock
        self.value: Optional[str] = None
        self._asked_at: Optional[float] = None

    def get(self) -> Optional[str]:
        if self.stage_hint is None:
            return None
        now = self.clock()
        if self._asked_at is None or now - self._asked_at >= HINT_INTERVAL_S:
            self._asked_at = now
            self.value = self.stage_hint()
        return self.value


class _Bar:
    """A ``tqdm.auto`` bar counting source records, with the total (and so an ETA) when known."""

    def __init__(self, total: Optional[int], desc: str, hint: _Hint) -> None:
        from tqdm.auto import tqdm

        self.bar: Any = tqdm(total=total, desc=desc, unit=" records", unit_scale=True, dynamic_ncols=True)
        self.hint = hint
        self.outputs = 0

    def advance(self, source_records: int, outputs: int) -> None:
        self.outputs += outputs
        stage = self.hint.get()
        postfix = f"out={self.outputs:,}" + (f", bottleneck: {stage}" if stage else "")
        self.bar.set_postfix_str(postfix, refresh=False)  # drawn by update(), at most every mininterval
        self.bar.update(source_records)

    def finish(self) -> None:
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class _LogLines:
    """Progress as log lines (stderr is not a terminal); see the module docstring."""

    def __init__(self, total: Optional[int], interval_s: float, hint: _Hint, clock: Callable[[], float]) -> None:
        self.total = total
        self.interval_s = interval_s
        self.hint = hint
        self.clock = clock
        self.started_at = clock()
        self.logged_at = self.started_at
        self.read = 0
        self.outputs = 0
        self._fallback: Optional[logging.Handler] = None

    def advance(self, source_records: int, outputs: int) -> None:
        self.read += source_records
        self.outputs += outputs
        now = self.clock()
        if now - self.logged_at >= self.interval_s:
            self.logged_at = now
            self._emit(progress_line(self.read, self.total, now - self.started_at, self.outputs, self.hint.get()))

    def finish(self) -> None:
        self._emit(done_line(self.read, self.clock() - self.started_at, self.outputs))

    def close(self) -> None:
        return None

    def _emit(self, message: str) -> None:
        if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
            logger.info(message)
            return
        # Nobody would see an INFO record: write the line to stderr ourselves, without
        # changing the logging configuration (a handler of our own, on no logger).
        if self._fallback is None:
            self._fallback = logging.StreamHandler(sys.stderr)
            self._fallback.setFormatter(logging.Formatter("[%(asctime)s] %(name)s: %(message)s"))
        self._fallback.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, (), None))


def with_progress(
    outputs: Iterable[TaskOutput],
    enabled: bool,
    total: Optional[int] = None,
    *,
    stage_hint: Optional[StageHint] = None,
    desc: str = "streamproc",
    interactive: Optional[bool] = None,
    interval_s: Optional[float] = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[TaskOutput]:
    """Passes ``outputs`` through, reporting progress when ``enabled`` (main process).

    Args:
        outputs: a run handle's outputs.
        enabled: ``show_progress``; when False the outputs pass through untouched.
        total: the source records the run will read (None: unknown; no ETA).
        stage_hint: names the stage limiting the run (see the module docstring).
        desc: the bar's label.
        interactive: a bar (True) or log lines (False); default :func:`stderr_is_interactive`.
        interval_s: seconds between log lines; default :func:`log_interval_s`.
        clock: a monotonic clock in seconds (tests pass a fake one).

    The final line (log mode) is written only when ``outputs`` is exhausted, not after an
    error or an early stop; the bar is closed on every exit path.
    """
    if not enabled:
        yield from outputs
        return
    hint = _Hint(stage_hint, clock)
    if interactive is None:
        interactive = stderr_is_interactive()
    reporter: _Reporter
    if interactive:
        reporter = _Bar(total, desc, hint)
    else:
        reporter = _LogLines(total, log_interval_s() if interval_s is None else interval_s, hint, clock)
    try:
        for output in outputs:
            reporter.advance(output.source_records, output.count)
            yield output
        reporter.finish()
    finally:
        reporter.close()
