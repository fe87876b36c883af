"""Run statistics: what a run measured, per stage and per process, and how they add up.

:class:`TaskStats` is measured where tasks run (see :mod:`streamproc.execution.timing`),
summed there over the tasks of a process or thread and handed to the main process now and
then (on a task's last output, at most every ``timing.STATS_SEND_INTERVAL_S``, and at the
run's end), or with each task's last output where a task's own figures are needed.
:class:`ProcessStats` is measured by each process of the run (the main process, CPU workers,
GPU workers, worker threads) and reaches the main process at the run's end.
:class:`RunStats` merges them in the main process: the run handle
(:class:`streamproc.backends.base.RunHandle`) fills it, :mod:`streamproc.stats_report` prints
it and :mod:`streamproc.bottleneck` reads a hint out of it.

Every figure is a sum of seconds measured once per chunk (stages), per message (workers) or
per batch (GPU workers): never per record. Times are ``time.perf_counter`` seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import pandas

    from .bottleneck import Bottleneck


def where_label(where: str) -> str:
    """The kind of place a name like ``"cpu worker 3"`` or ``"thread streamproc-thread-0"`` is."""
    if where.startswith("cpu worker"):
        return "CPU workers"
    if where.startswith("gpu worker") or where == "GPU workers":
        return "GPU workers"
    if where.startswith("thread"):
        return "worker threads"
    return where


@dataclass
class StageStats:
    """One stage's counters (``index`` 0 is the source read; stages count from 1).

    ``seconds`` is the time in the stage's own code (not upstream, not the source, not
    forward); ``forward_seconds`` (``map_gpu`` only) the time its forward took as seen from
    where the stage ran: forward itself when it ran in process, waiting for the GPU workers
    otherwise (``forward_where``). ``real_tokens``/``padded_tokens``: the batches' record
    sizes summed, and their largest size times the batch length (when ``batch_by`` gives sizes).
    """

    index: int
    name: str
    where: str
    records_in: int = 0
    records_out: int = 0
    batches: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    forward_batches: int = 0
    forward_where: Optional[str] = None
    real_tokens: int = 0
    padded_tokens: int = 0

    def add(self, other: StageStats) -> None:
        """Adds another task's counters for the same stage (main process)."""
        self.records_in += other.records_in
        self.records_out += other.records_out
        self.batches += other.batches
        self.seconds += other.seconds
        self.forward_seconds += other.forward_seconds
        self.forward_batches += other.forward_batches
        self.real_tokens += other.real_tokens
        self.padded_tokens += other.padded_tokens
        if other.where != self.where and where_label(other.where) != self.where:
            self.where = _joined(self.where, other.where) or self.where
        if other.forward_where != self.forward_where and where_label(other.forward_where or "") != self.forward_where:
            self.forward_where = _joined(self.forward_where, other.forward_where)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Positional fields: a tuple pickles in a fraction of a dataclass's default state dict
        # (one TaskStats travels per task, see docs/benchmarks.md "Stats overhead").
        return StageStats, (
            self.index, self.name, self.where, self.records_in, self.records_out, self.batches, self.seconds,
            self.forward_seconds, self.forward_batches, self.forward_where, self.real_tokens, self.padded_tokens,
        )


def _joined(mine: Optional[str], theirs: Optional[str]) -> Optional[str]:
    """Both place labels, once each (``"CPU workers, main process"``)."""
    labels = {where_label(part) for text in (mine, theirs) if text for part in text.split(", ")}
    return ", ".join(sorted(labels)) if labels else None


#: One stage's counters in a task, as they travel: ``(index, name, records_in, records_out,
#: batches, seconds)``, or a whole :class:`StageStats` for a ``map_gpu`` stage (forward, tokens).
StageRow = Any


@dataclass
class TaskStats:
    """What the tasks one process or thread ran measured: one task, or several summed.

    ``where`` is the process or thread that ran them (``ExecutionContext.where``); ``seconds``
    their busy time there (the stages, forward as seen there, and ``finalize``); ``stages`` a
    :data:`StageRow` for the source read (index 0) and each stage: plain tuples, so that
    they cost little to build and to pickle. ``tasks`` is how many tasks the figures sum
    (1: the stats of one task, on its last output); ``longest``/``second_longest`` are the
    busy seconds of the two longest of them (with ``tasks == 1``: ``seconds`` and 0). A
    process that runs many tasks sums them where it runs and sends one of these now and then
    (see :class:`streamproc.execution.timing.StageTimer`), not one per task. Nothing of it
    lives in a global.
    """

    where: str = "main process"
    seconds: float = 0.0
    stages: list[StageRow] = field(default_factory=list)
    finalize_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    tasks: int = 1
    longest: float = 0.0
    second_longest: float = 0.0

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return TaskStats, (
            self.where, self.seconds, self.stages, self.finalize_seconds, self.extra, self.tasks, self.longest,
            self.second_longest,
        )

    @property
    def longest_two(self) -> tuple[float, float]:
        """The busy seconds of the two longest tasks these figures sum (0.0 where fewer)."""
        if self.tasks == 1:
            return max(self.seconds, self.longest), 0.0
        return self.longest, self.second_longest

    def stage_stats(self) -> list[StageStats]:
        """``stages`` as :class:`StageStats` objects."""
        return [row if isinstance(row, StageStats) else StageStats(row[0], row[1], self.where, *row[2:]) for row in self.stages]


@dataclass
class ProcessStats:
    """One process (or worker thread) of a run: where its wall time went.

    ``kind`` is ``"main"``, ``"cpu"``, ``"gpu"`` or ``"thread"``. ``busy_seconds``: running
    tasks (CPU workers, threads, the simple backend's main process) or batches (GPU workers:
    copies + forward); ``input_wait_seconds``: waiting for work (a task, a batch; the main
    process of a parallel backend: waiting for outputs); ``output_blocked_seconds``: blocked
    handing results on (backpressure). ``startup_seconds``: from the process's creation to its
    first task or batch possible (spawn, imports, plan and model load).

    GPU workers: ``h2d_seconds`` (host-to-device copy, as issued from the host),
    ``forward_seconds`` and ``d2h_seconds`` (outputs back to the host), ``idle_seconds``
    waiting for a batch, ``batches``; ``swaps`` and ``swap_seconds``: under
    ``gpu_memory_budget``, model loads that first moved other models off the device, and the
    seconds those moves took (also for the process or threads that run forward themselves: the
    simple and threads backends count them in the main process's entry). Main process: ``source_seconds`` (iterating the source
    for tasks), ``reorder_wait_seconds`` (deterministic runs: waiting while finished outputs
    are held behind an unfinished earlier task), ``sink_seconds`` (the sink's writes).
    """

    name: str
    kind: str
    wall_seconds: float = 0.0
    startup_seconds: float = 0.0
    busy_seconds: float = 0.0
    input_wait_seconds: float = 0.0
    output_blocked_seconds: float = 0.0
    tasks: int = 0
    h2d_seconds: float = 0.0
    forward_seconds: float = 0.0
    d2h_seconds: float = 0.0
    idle_seconds: float = 0.0
    batches: int = 0
    swaps: int = 0
    swap_seconds: float = 0.0
    source_seconds: float = 0.0
    reorder_wait_seconds: float = 0.0
    sink_seconds: float = 0.0

    @property
    def busy_fraction(self) -> float:
        """Busy seconds over wall seconds excluding start-up (GPU: (copies + forward) / that)."""
        wall = self.wall_seconds - self.startup_seconds
        busy = self.h2d_seconds + self.forward_seconds + self.d2h_seconds if self.kind == "gpu" else self.busy_seconds
        return min(1.0, busy / wall) if wall > 0 else 0.0

    def merge(self, other: ProcessStats) -> None:
        """Takes the figures ``other`` measured (its non-zero ones), adding task counts."""
        for f in dataclasses.fields(self):
            if f.name in ("name", "kind"):
                continue
            value = getattr(other, f.name)
            if f.name == "tasks":
                self.tasks += value
            elif value:
                setattr(self, f.name, value)


@dataclass
class RunStats:
    """What one run did and where its time went: filled in by the run handle (main process).

    ``tasks_done``/``records_out`` count what reached the consumer; ``stages`` merges every
    task's :class:`TaskStats` (index 0: the source read); ``processes`` holds one
    :class:`ProcessStats` per process or worker thread, ``"main process"`` first.
    ``wall_seconds`` runs from the handle's creation to its end; ``max_task_seconds`` and
    ``second_task_seconds`` are the two longest tasks' busy times. See
    :mod:`streamproc.stats_report` for the report and :mod:`streamproc.bottleneck` for the hint.
    """

    backend: str
    tasks_done: int = 0
    records_out: int = 0
    finished: bool = False
    wall_seconds: float = 0.0
    _stages: dict[int, StageStats] = field(default_factory=dict, repr=False)
    processes: dict[str, ProcessStats] = field(default_factory=dict)
    max_task_seconds: float = 0.0
    second_task_seconds: float = 0.0
    task_seconds: float = 0.0
    deterministic: Optional[bool] = None
    writes_in_workers: bool = False

    #: Tasks not yet merged into ``stages``: merging waits until someone reads them, so that
    #: the main process only appends a task's stats while the run goes (see :meth:`add_task`).
    _pending: list[TaskStats] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.processes.setdefault("main process", ProcessStats("main process", "main"))

    @property
    def stages(self) -> dict[int, StageStats]:
        """Every task's stage counters merged, by stage index (0: the source read; -1: finalize)."""
        if self._pending:
            pending, self._pending = self._pending, []
            for task in pending:
                self._merge_task(task)
        return self._stages

    @property
    def main(self) -> ProcessStats:
        """The main process's figures."""
        return self.processes["main process"]

    def add_task(self, task: TaskStats) -> None:
        """Takes the stats of one finished task, or of several summed where they ran (main process).

        Stage counters are merged when read; the task count, busy seconds and the two longest
        tasks are taken at once.
        """
        self._pending.append(task)
        if len(self._pending) >= 256:  # bounded memory: merge in batches
            _ = self.stages
        self.task_seconds += task.seconds
        for seconds in task.longest_two:
            if seconds > self.max_task_seconds:
                self.max_task_seconds, self.second_task_seconds = seconds, self.max_task_seconds
            elif seconds > self.second_task_seconds:
                self.second_task_seconds = seconds
        process = self.process(task.where)
        process.tasks += task.tasks
        if process.kind != "cpu":  # a CPU worker measures its own busy time (RunEnded), tasks or not
            process.busy_seconds += task.seconds

    def _merge_task(self, task: TaskStats) -> None:
        stages = self._stages
        for row in task.stages:
            if type(row) is tuple:  # the common case: add the counters without building a StageStats
                mine = stages.get(row[0])
                if mine is not None and mine.where == where_label(task.where):
                    mine.records_in += row[2]
                    mine.records_out += row[3]
                    mine.batches += row[4]
                    mine.seconds += row[5]
                    continue
            stage = row if isinstance(row, StageStats) else StageStats(row[0], row[1], task.where, *row[2:])
            mine = stages.get(stage.index)
            if mine is None:
                stage.where = where_label(stage.where)
                stage.forward_where = _joined(stage.forward_where, None)
                stages[stage.index] = dataclasses.replace(stage)
            else:
                mine.add(stage)
        if task.finalize_seconds:
            finalize = stages.get(-1)
            if finalize is None:
                finalize = stages[-1] = StageStats(-1, "finalize (sink's, in the task)", where_label(task.where))
            finalize.add(StageStats(-1, finalize.name, task.where, seconds=task.finalize_seconds))

    def process(self, name: str, kind: Optional[str] = None) -> ProcessStats:
        """The :class:`ProcessStats` of ``name``, made on first use."""
        stats = self.processes.get(name)
        if stats is None:
            if kind is None:
                kind = {"CPU workers": "cpu", "GPU workers": "gpu", "worker threads": "thread"}.get(where_label(name), "main")
            stats = self.processes[name] = ProcessStats(name, kind)
        return stats

    def add_process(self, stats: ProcessStats) -> None:
        """Merges what a process reported at the run's end (main process)."""
        self.process(stats.name, stats.kind).merge(stats)

    # -- derived figures --------------------------------------------------------------------
    def stage_rows(self) -> list[StageStats]:
        """The stages in source-to-sink order (source read first, finalize last)."""
        return [self.stages[i] for i in sorted(self.stages, key=lambda i: (i < 0, i))]

    @property
    def stage_seconds(self) -> float:
        """Seconds of every stage row, forward as seen from the stage included."""
        return sum(s.seconds + s.forward_seconds for s in self.stages.values())

    def workers(self, kind: str) -> list[ProcessStats]:
        return [p for p in self.processes.values() if p.kind == kind]

    @property
    def task_runners(self) -> list[ProcessStats]:
        """The processes or threads that ran tasks (CPU workers, threads, or the main process)."""
        runners = [p for p in self.processes.values() if p.kind in ("cpu", "thread")]
        return runners or [self.main]

    @property
    def bottleneck(self) -> Bottleneck:
        """The limiting resource and what to do about it (see :mod:`streamproc.bottleneck`)."""
        from .bottleneck import find_bottleneck

        return find_bottleneck(self)

    def report(self) -> str:
        """A fixed-width table: stages, processes, the bottleneck hint."""
        from .stats_report import format_report

        return format_report(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the run's totals, ``stages`` and ``processes`` lists, the ``bottleneck``."""
        from .stats_report import run_to_dict

        return run_to_dict(self)

    def to_pandas(self) -> pandas.DataFrame:
        """One row per stage and per process (column ``row``: ``"stage"`` or ``"process"``)."""
        from .stats_report import run_to_pandas

        return run_to_pandas(self)

    def __str__(self) -> str:
        return self.report()
