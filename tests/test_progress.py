"""Progress: totals from sized sources, what the bar counts, and the log lines of a non-terminal stderr."""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc import progress
from streamproc.backends.registry import get_backend
from streamproc.execution.selection import TaskSelection
from streamproc.execution.task import TaskOutput
from streamproc.io.sinks import ListSink, progress_for
from streamproc.plan import Plan, build_plan
from tests.hang_guard import run_guarded
from tests.utils import assert_outputs, double, is_odd

GUARD_TIMEOUT_S = 120


class FakeClock:
    """A clock the test advances by hand: log intervals and rates without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def outputs_of(counts: list[tuple[int, int]]) -> list[TaskOutput]:
    """TaskOutputs reading ``read`` source records and producing ``out`` records each."""
    return [TaskOutput(i, None, out, source_records=read) for i, (read, out) in enumerate(counts)]


# -- totals ------------------------------------------------------------------------------------


def test_sized_iterables_know_their_size():
    assert sp.from_iterable(list(range(7))).source.num_records() == 7
    assert sp.from_iterable(tuple("abc")).source.num_records() == 3
    assert sp.from_iterable(range(10, 30)).source.num_records() == 20


def test_generators_and_dataframes_in_from_iterable_have_no_size():
    assert sp.from_iterable(i for i in range(3)).source.num_records() is None
    assert sp.from_iterable(iter([1, 2])).source.num_records() is None
    # A DataFrame iterates over its column names, not its rows.
    assert sp.from_iterable(pd.DataFrame({"a": [1, 2, 3]})).source.num_records() is None


def test_pandas_source_size():
    assert sp.from_pandas(pd.DataFrame({"a": range(12), "b": "x"})).source.num_records() == 12


def test_parquet_size_is_the_sum_of_the_files_metadata(tmp_path):
    for name, rows in [("a.parquet", 25), ("b.parquet", 40)]:
        pq.write_table(pa.table({"id": list(range(rows))}), tmp_path / name, row_group_size=10)
    assert sp.read_parquet(tmp_path).source.num_records() == 65
    assert sp.read_parquet(tmp_path / "b.parquet", columns=["id"]).source.num_records() == 40


def test_jsonl_size_is_unknown(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert sp.read_jsonl(path).source.num_records() is None


def test_arrow_sources_know_their_size(tmp_path):
    import pyarrow.dataset as pads

    table = pa.table({"id": list(range(33))})
    assert sp.from_arrow(table).source.num_records() == 33
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=10)
    pq.write_table(table.slice(0, 5), tmp_path / "b.parquet")
    assert sp.from_arrow(pads.dataset(tmp_path)).source.num_records() == 38


def test_non_parquet_arrow_datasets_are_not_counted(tmp_path):
    import pyarrow.csv as pacsv
    import pyarrow.dataset as pads

    pacsv.write_csv(pa.table({"id": [1, 2, 3]}), tmp_path / "a.csv")
    assert sp.from_arrow(pads.dataset(tmp_path, format="csv")).source.num_records() is None


def test_huggingface_dataset_size():
    datasets = pytest.importorskip("datasets")
    assert sp.from_huggingface(datasets.Dataset.from_dict({"a": list(range(9))})).source.num_records() == 9


def test_limit_size():
    assert sp.from_iterable(list(range(100))).limit(30).source.num_records() == 30
    assert sp.from_iterable(list(range(10))).limit(30).source.num_records() == 10
    assert sp.from_iterable(list(range(10))).map(double).limit(30).source.num_records() == 10
    assert sp.from_iterable(iter(range(10))).limit(30).source.num_records() == 30  # an upper bound
    assert sp.from_iterable(list(range(10))).filter(is_odd).limit(30).source.num_records() == 30


def test_runs_that_skip_tasks_have_no_total(monkeypatch):
    seen: list[Any] = []

    def fake_progress(handle: Any, enabled: bool, total: Any, **kwargs: Any) -> Any:
        seen.append(total)
        return iter(handle)

    monkeypatch.setattr("streamproc.io.sinks.with_progress", fake_progress)
    plan = build_plan(sp.from_iterable(list(range(100))).set_processing(show_progress=True, task_size=10))
    list(progress_for([], plan))
    list(progress_for([], dataclasses.replace(plan, task_selection=TaskSelection(rank=0, world_size=2))))
    list(progress_for([], dataclasses.replace(plan, task_selection=TaskSelection(2, done_groups=frozenset({0})))))
    list(progress_for([], dataclasses.replace(plan, task_selection=TaskSelection(2))))  # a resume with nothing done
    assert seen == [100, None, None, 100]


# -- what is counted -----------------------------------------------------------------------------


def test_source_records_sum_to_the_records_read_whatever_the_outputs(backend_options):
    """A filter halves the outputs and a flatten doubles them: the source count stays exact."""

    def run() -> list[TaskOutput]:
        stream = (
            sp.from_iterable(list(range(95)))
            .filter(is_odd)
            .map(lambda x: [x, x])
            .flatten()
            .set_processing(task_size=10, **backend_options)
        )
        return list(_outputs(stream))

    outputs = run_guarded(run, GUARD_TIMEOUT_S, "a run's outputs")
    assert sum(o.source_records for o in outputs) == 95
    assert sum(o.count for o in outputs) == 2 * 47


def _outputs(stream: sp.Stream) -> Any:
    return _outputs_of_plan(build_plan(stream))


def _outputs_of_plan(plan: Plan) -> Any:
    with get_backend(plan.options.effective_backend).run(plan, ListSink()) as handle:
        yield from handle


def test_a_task_s_chunks_carry_its_reads():
    stream = sp.from_pandas(pd.DataFrame({"a": range(25)})).set_processing(task_size=25)
    plan = dataclasses.replace(build_plan(stream), chunk_size=10)
    outputs = list(_outputs_of_plan(plan))
    assert [o.count for o in outputs] == [10, 10, 5]
    assert sum(o.source_records for o in outputs) == 25


# -- the bar ---------------------------------------------------------------------------------------


def test_bar_has_total_and_counts_source_records(capsys):
    result = list(progress.with_progress(outputs_of([(10, 5), (10, 0), (5, 5)]), True, total=25, interactive=True))
    assert len(result) == 3
    err = capsys.readouterr().err
    assert re.search(r"\b25(\.0)?/25(\.0)?\b", err), err
    assert "out=10" in err


def test_bar_postfix_names_the_stage_from_the_hint(capsys):
    calls: list[int] = []

    def hint() -> str:
        calls.append(1)
        return "stage 2 (map(tokenize))"

    clock = FakeClock()
    list(progress.with_progress(outputs_of([(1, 1)] * 5), True, total=5, stage_hint=hint, interactive=True, clock=clock))
    assert "bottleneck: stage 2 (map(tokenize))" in capsys.readouterr().err
    assert len(calls) == 1  # the clock did not move: asked once per HINT_INTERVAL_S


def test_disabled_progress_passes_outputs_through(capsys):
    outputs = outputs_of([(3, 3)])
    assert list(progress.with_progress(outputs, False, total=3)) == outputs
    assert capsys.readouterr().err == ""


# -- log lines (stderr is not a terminal) ----------------------------------------------------------


def test_log_lines_at_intervals_with_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="streamproc")
    clock = FakeClock()
    outputs = outputs_of([(100, 100)] * 10)

    def timed() -> Any:
        for output in outputs:
            clock.now += 5.0  # each output arrives 5 s after the previous one
            yield output

    result = list(progress.with_progress(timed(), True, total=1000, interactive=False, interval_s=20.0, clock=clock))
    assert len(result) == 10
    lines = [r.getMessage() for r in caplog.records if r.name == "streamproc"]
    # Outputs at t = 5, 10, ..., 50 s: a line at 20 and at 40 s, then the final one.
    assert lines == [
        "progress: 400/1,000 records (40.0%), 20.0 records/s, ETA 0:00:30, out=400",
        "progress: 800/1,000 records (80.0%), 20.0 records/s, ETA 0:00:10, out=800",
        "done: 1,000 records read in 0:00:50 (20.0 records/s), 1,000 out",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "streamproc")


def test_log_lines_without_total_have_no_eta(caplog):
    caplog.set_level(logging.INFO, logger="streamproc")
    clock = FakeClock()

    def timed() -> Any:
        for output in outputs_of([(10, 3), (10, 3)]):
            clock.now += 1.0
            yield output

    list(progress.with_progress(timed(), True, None, interactive=False, interval_s=0.0, clock=clock))
    lines = [r.getMessage() for r in caplog.records if r.name == "streamproc"]
    assert lines[0] == "progress: 10 records, 10.0 records/s, out=3"
    assert "ETA" not in " ".join(lines)
    assert lines[-1] == "done: 20 records read in 0:00:02 (10.0 records/s), 6 out"


def test_no_final_line_after_an_error(caplog):
    caplog.set_level(logging.INFO, logger="streamproc")

    def failing() -> Any:
        yield from outputs_of([(1, 1)])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(progress.with_progress(failing(), True, 2, interactive=False, interval_s=1e9))
    assert not [r for r in caplog.records if r.getMessage().startswith("done:")]


def test_lines_go_to_stderr_when_logging_would_drop_them(capsys, caplog):
    caplog.set_level(logging.WARNING, logger="streamproc")  # INFO records would be dropped
    list(progress.with_progress(outputs_of([(7, 7)]), True, 7, interactive=False, interval_s=1e9))
    err = capsys.readouterr().err
    assert re.search(r"streamproc: done: 7 records read in 0:00:00", err), err
    assert not [r for r in caplog.records if r.name == "streamproc"]


def test_end_to_end_log_line_with_total(caplog, backend_options):
    caplog.set_level(logging.INFO, logger="streamproc")
    stream = sp.from_iterable(list(range(60))).map(double).filter(is_odd)
    stream = stream.set_processing(show_progress=True, task_size=7, **backend_options)
    monkey = pytest.MonkeyPatch()
    monkey.setenv(progress.LOG_INTERVAL_ENV, "0")
    try:
        result = run_guarded(stream.to_list, GUARD_TIMEOUT_S, "to_list with progress")
    finally:
        monkey.undo()
    assert_outputs(result, [], backend_options)  # doubles are never odd
    lines = [r.getMessage() for r in caplog.records if r.name == "streamproc"]
    assert lines[-1].startswith("done: 60 records read in "), lines
    assert any(line.startswith("progress: ") and "/60 records" in line and "ETA" in line for line in lines), lines


def test_parquet_run_reports_its_total(tmp_path, caplog, monkeypatch, backend_options):
    """Row groups are read in the workers: their counts travel back with the outputs."""
    pq.write_table(pa.table({"id": list(range(50))}), tmp_path / "a.parquet", row_group_size=20)
    caplog.set_level(logging.INFO, logger="streamproc")
    monkeypatch.setenv(progress.LOG_INTERVAL_ENV, "0")
    stream = sp.read_parquet(tmp_path).set_processing(show_progress=True, **backend_options)
    assert len(run_guarded(stream.to_list, GUARD_TIMEOUT_S, "parquet to_list with progress")) == 50
    lines = [r.getMessage() for r in caplog.records if r.name == "streamproc"]
    counts = [line.split(" (")[0] for line in lines if line.startswith("progress")]
    if backend_options.get("backend") == "simple":
        assert counts == ["progress: 20/50 records", "progress: 40/50 records", "progress: 50/50 records"]
    assert counts[-1] == "progress: 50/50 records"
    assert lines[-1].startswith("done: 50 records read in ")


def test_iterating_a_stream_reports_progress(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="streamproc")
    monkeypatch.setenv(progress.LOG_INTERVAL_ENV, "0")
    stream = sp.from_iterable(list(range(30))).set_processing(show_progress=True, task_size=10)
    assert list(stream) == list(range(30))
    lines = [r.getMessage() for r in caplog.records if r.name == "streamproc"]
    assert [line.split(" (")[0] for line in lines[:-1]] == [f"progress: {n}/30 records" for n in (10, 20, 30)]


def test_interactive_when_stderr_is_a_terminal(monkeypatch):
    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress.sys, "stderr", Terminal())
    assert progress.stderr_is_interactive()


def test_not_interactive_in_a_log_file(monkeypatch, tmp_path):
    with open(tmp_path / "slurm.log", "w") as log:
        monkeypatch.setattr(progress.sys, "stderr", log)
        monkeypatch.delitem(progress.sys.modules, "ipykernel", raising=False)
        assert not progress.stderr_is_interactive()


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_bad_interval_variable_is_refused(value):
    with pytest.raises(ValueError, match=progress.LOG_INTERVAL_ENV):
        progress.log_interval_s({progress.LOG_INTERVAL_ENV: value})


def test_interval_variable():
    assert progress.log_interval_s({progress.LOG_INTERVAL_ENV: "2.5"}) == 2.5
    assert progress.log_interval_s({}) == progress.LOG_INTERVAL_S
