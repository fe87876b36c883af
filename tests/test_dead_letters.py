"""``on_error="dead_letter"``: one parquet file per task with errors, written atomically.

Checks the files' names, columns and rows on every backend (against the simple backend's
rows), what a run does with the dead letters of an earlier one (new, overwrite, resume), and
that a file is complete or absent. Every run is under the hang guard.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import dill
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.execution.error_policy import MAX_RECORD_REPR_CHARS, RecordError, record_text
from streamproc.io import dead_letters
from streamproc.io.dead_letters import DEAD_LETTER_COLUMNS, DeadLetterWriter, dead_letter_name
from streamproc.plan import build_plan
from tests.hang_guard import run_guarded
from tests.utils import UserError

RUN_TIMEOUT_S = 60.0


class FailsOn:
    """A map fn raising ``UserError`` on records whose ``"id"`` is in ``bad``; a line of its own to find in tracebacks."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad
        self.__name__ = "fails_on"

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        if record["id"] in self.bad:
            raise UserError(f"cannot process id {record['id']}")  # the line tracebacks show
        return {**record, "ok": True}


def records(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"t{i}"} for i in range(n)]


def run_dead_letter(stream: sp.Stream, path: Path, **options: Any) -> list[Any]:
    def go() -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sp.RecordsSkippedWarning)
            return stream.set_processing(on_error="dead_letter", dead_letter_path=str(path), **options).to_list()

    return run_guarded(go, RUN_TIMEOUT_S, "the run")


def sources_of(stream: sp.Stream, key: int, row: int) -> set[str]:
    """What the stream's source says record ``row`` of task ``key`` is (``Source.locate``): as
    the main process's source says it, or the copy a backend hands to its workers (which has no
    records of an in-memory source, and may describe itself differently)."""
    plan = build_plan(stream)
    payload = next(itertools.islice(plan.source.iter_tasks(plan.task_size), key, None))
    copy = dill.loads(dill.dumps(plan.source))
    return {plan.source.locate(payload, row), copy.locate(payload, row)}


def read_dead_letters(path: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: pq.read_table(path / name).to_pylist() for name in sorted(os.listdir(path)) if name.endswith(".parquet")}


def test_one_file_per_task_with_errors_and_its_rows(backend_options, tmp_path):
    bad = {3, 5, 17}
    stream = sp.from_iterable(records(24)).map(FailsOn(bad)).set_processing(task_size=8)
    outputs = run_dead_letter(stream, tmp_path / "simple", backend="simple")
    assert [r["id"] for r in outputs] == [i for i in range(24) if i not in bad]
    assert run_dead_letter(stream, tmp_path / "run", **backend_options) == outputs

    expected = read_dead_letters(tmp_path / "simple")
    files = read_dead_letters(tmp_path / "run")
    assert list(files) == ["dead-00000000.parquet", "dead-00000002.parquet"]  # task 1 had no error
    assert pq.read_schema(tmp_path / "run" / "dead-00000000.parquet") == pa.schema(
        [(name, pa.int64() if name == "task" else pa.string()) for name in DEAD_LETTER_COLUMNS]
    )
    stage = "stage 1 (map(fails_on))"
    for name, rows in files.items():
        assert [(r["task"], r["stage"], r["error_type"], r["message"]) for r in rows] == [
            (r["task"], r["stage"], r["error_type"], r["message"]) for r in expected[name]
        ]
        for row in rows:
            assert row["stage"] == stage and row["error_type"] == "UserError"
            record = json.loads(row["record"])
            assert row["message"] == f"cannot process id {record['id']}"
            assert record == {"id": record["id"], "text": f"t{record['id']}"}
            # The row in its task: source rows, with only maps before the stage.
            assert row["source"] in sources_of(stream, record["id"] // 8, record["id"] % 8), row["source"]
            assert "raise UserError(f\"cannot process id {record['id']}\")" in row["traceback"]
    # Rows in the order the errors occurred.
    assert [json.loads(r["record"])["id"] for r in files["dead-00000000.parquet"]] == [3, 5]
    assert [r["task"] for r in files["dead-00000002.parquet"]] == [2]


def bad_batch(batch: list[int]) -> list[int]:
    if 6 in batch:
        raise ValueError("six in batch")
    return batch


def test_batch_op_rows_name_the_record_that_failed_alone(backend_options, tmp_path):
    stream = sp.from_iterable(range(16)).map_batches(bad_batch, batch_size=4).set_processing(task_size=8)
    assert run_dead_letter(stream, tmp_path, **backend_options) == [i for i in range(16) if i != 6]
    [row] = read_dead_letters(tmp_path)["dead-00000000.parquet"]
    assert (row["record"], row["error_type"], row["message"], row["task"]) == ("6", "ValueError", "six in batch", 0)
    assert row["source"] in sources_of(stream, 0, 6)
    assert 'raise ValueError("six in batch")' in row["traceback"]  # the traceback of the batch of one


def keep_odd(record: dict[str, Any]) -> bool:
    return record["id"] % 2 == 1


def test_row_counts_the_inputs_of_the_stage_that_raised(tmp_path):
    """After a filter, the row is the record's place among the failing stage's inputs."""
    stream = sp.from_iterable(records(16)).filter(keep_odd).map(FailsOn({7})).set_processing(task_size=16)
    run_dead_letter(stream, tmp_path)
    [row] = read_dead_letters(tmp_path)["dead-00000000.parquet"]
    assert row["stage"] == "stage 2 (map(fails_on))"
    assert row["source"] in sources_of(stream, 0, 3)  # id 7 is the 4th odd id, the map's input 3


def test_write_parquet_in_workers_keeps_the_dead_letters(tmp_path):
    """deterministic=False: the workers write the parts; the errors still reach the main process."""
    stream = (
        sp.from_iterable(records(40))
        .map(FailsOn({4, 25}))
        .set_processing(
            backend="multiprocessing",
            num_cpu_workers=2,
            deterministic=False,
            task_size=10,
            on_error="dead_letter",
            dead_letter_path=str(tmp_path / "dead"),
        )
    )

    def write() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sp.RecordsSkippedWarning)
            return stream.write_parquet(tmp_path / "out")

    run_guarded(write, RUN_TIMEOUT_S)
    ids = sorted(pq.read_table(tmp_path / "out").column("id").to_pylist())
    assert ids == [i for i in range(40) if i not in (4, 25)]
    files = read_dead_letters(tmp_path / "dead")
    assert {name: [json.loads(r["record"])["id"] for r in rows] for name, rows in files.items()} == {
        "dead-00000000.parquet": [4],
        "dead-00000002.parquet": [25],
    }


def test_record_that_is_not_json_is_stored_as_its_repr(tmp_path):
    items = [{"id": 0, "tags": {"a"}}, {"id": 1, "tags": {"b"}}]
    stream = sp.from_iterable(items).map(FailsOn({1}))
    run_dead_letter(stream, tmp_path)
    [row] = read_dead_letters(tmp_path)["dead-00000000.parquet"]
    assert row["record"] == repr({"id": 1, "tags": {"b"}})


def test_huge_repr_is_cut_and_says_so():
    record = {"x": b"y" * (3 * MAX_RECORD_REPR_CHARS)}
    text = record_text(record)
    assert text.startswith("{'x': b'yyy")
    assert len(text) < MAX_RECORD_REPR_CHARS + 100
    assert text.endswith(f"[repr cut at {MAX_RECORD_REPR_CHARS} of {len(repr(record))} characters]")
    big_json = {"text": "z" * (3 * MAX_RECORD_REPR_CHARS)}
    assert json.loads(record_text(big_json)) == big_json  # JSON is kept whole: it can be replayed


def test_map_gpu_forward_errors_in_a_gpu_worker_are_dead_lettered(tmp_path):
    pytest.importorskip("torch")
    from tests.test_on_error import GPU_WORKERS, ForwardRaisesAt, as_floats, to_tensor

    stream = sp.from_iterable(range(24)).map_gpu(to_tensor, ForwardRaisesAt(13, message="forward broke"), as_floats, batch_size=4)
    outputs = run_dead_letter(stream.set_processing(task_size=8), tmp_path, **GPU_WORKERS)
    assert outputs == [x / 2 for x in range(24) if x != 13]
    [row] = read_dead_letters(tmp_path)["dead-00000001.parquet"]
    assert row["stage"].endswith(", forward") and row["error_type"] == "UserError" and row["message"] == "forward broke"
    assert row["record"] == "13" and row["source"] in sources_of(stream.set_processing(task_size=8), 1, 5)
    assert "Traceback in gpu worker" in row["traceback"]


# -- an earlier run's dead letters -----------------------------------------------------------------


def test_earlier_dead_letters_are_refused_by_a_new_run(tmp_path):
    stream = sp.from_iterable(records(8)).map(FailsOn({2}))
    run_dead_letter(stream, tmp_path)
    with pytest.raises(FileExistsError, match=f"dead_letter_path '{tmp_path}' already holds 1 dead-letter file"):
        run_dead_letter(stream, tmp_path)


def test_sink_overwrite_clears_only_dead_letter_files(tmp_path):
    dead = tmp_path / "dead"
    stream = sp.from_iterable(records(16)).map(FailsOn({2, 12})).set_processing(task_size=8)
    run_dead_letter(stream, dead)
    (dead / "notes.txt").write_text("mine")
    (dead / ".dead-00000009.parquet.inprogress").write_bytes(b"half")  # a crashed run's

    def write() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sp.RecordsSkippedWarning)
            s = (
                sp.from_iterable(records(16))
                .map(FailsOn({3}))
                .set_processing(task_size=8, on_error="dead_letter", dead_letter_path=str(dead))
            )
            return s.write_parquet(tmp_path / "out", overwrite=True)

    run_guarded(write, RUN_TIMEOUT_S)
    assert sorted(os.listdir(dead)) == ["dead-00000000.parquet", "notes.txt"]
    assert [json.loads(r["record"])["id"] for r in read_dead_letters(dead)["dead-00000000.parquet"]] == [3]
    assert pq.read_table(tmp_path / "out").num_rows == 15


def test_dead_letters_may_not_go_inside_the_output_directory(tmp_path):
    stream = sp.from_iterable(records(4)).set_processing(on_error="dead_letter", dead_letter_path=str(tmp_path / "out" / "dead"))
    with pytest.raises(ValueError, match="is inside the output directory"):
        stream.write_parquet(tmp_path / "out")


def error(task: int, message: str) -> RecordError:
    return RecordError(f"item {task}", task, "stage 1 (map(f))", "ValueError", message, "Traceback...", str(task))


def test_resume_keeps_committed_dead_letters_and_replaces_rerun_ones(tmp_path):
    first = DeadLetterWriter(tmp_path, "new")
    first.write_task(1, [error(1, "first run")])
    first.write_task(2, [error(2, "first run")])
    first.write_task(3, [error(3, "first run")])
    resumed = DeadLetterWriter(tmp_path, "resume")
    resumed.write_task(2, [error(2, "second run")])  # rerun, failed again
    resumed.write_task(3, [])  # rerun, no error this time: its old file goes
    files = read_dead_letters(tmp_path)
    assert {name: [r["message"] for r in rows] for name, rows in files.items()} == {
        "dead-00000001.parquet": ["first run"],
        "dead-00000002.parquet": ["second run"],
    }
    assert resumed.written == [str(tmp_path / "dead-00000002.parquet")]


def test_writer_checks_its_mode_and_path(tmp_path):
    with pytest.raises(ValueError, match="mode='append' is invalid"):
        DeadLetterWriter(tmp_path, "append")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; give a directory path"):
        DeadLetterWriter(tmp_path / "file")


def test_a_file_appears_complete_or_not_at_all(tmp_path, monkeypatch):
    writer = DeadLetterWriter(tmp_path)
    seen: list[tuple[str, bool, int]] = []
    real_replace = os.replace

    def checking_replace(src: str, dst: str) -> None:
        # At the rename: the final name does not exist yet, and the hidden file is a whole parquet file.
        seen.append((os.path.basename(src), os.path.exists(dst), pq.read_table(src).num_rows))
        real_replace(src, dst)

    monkeypatch.setattr(dead_letters.os, "replace", checking_replace)
    writer.write_task(7, [error(7, "a"), error(7, "b")])
    assert seen == [(".dead-00000007.parquet.inprogress", False, 2)]

    def failing_write(table: Any, where: str) -> None:
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        writer.write_task(8, [error(8, "c")])
    assert sorted(os.listdir(tmp_path)) == [dead_letter_name(7)]


def test_an_aborted_run_writes_the_dead_letters_of_completed_tasks_only(tmp_path):
    """Tasks 0 and 1 complete (their dead letters are written); task 2 raises: nothing of it."""
    from tests.utils import CountingSource, collect_until_error

    stream = sp.from_iterable(CountingSource(records(24), fail_after=16)).map(FailsOn({1, 9, 17}))
    stream = stream.set_processing(task_size=8, on_error="dead_letter", dead_letter_path=str(tmp_path))
    outputs, exc = run_guarded(lambda: collect_until_error(stream), RUN_TIMEOUT_S)
    assert type(exc) is UserError
    assert [r["id"] for r in outputs] == [i for i in range(16) if i not in {1, 9}]
    assert sorted(os.listdir(tmp_path)) == ["dead-00000000.parquet", "dead-00000001.parquet"]


def test_ledger_writes_the_dead_letters_of_a_part_group_when_it_completes(tmp_path):
    """Workers writing parts send one unit per part group: its tasks' outputs share the group's
    ``task_index``, keep their own ``task_key``, and only the group's final one is ``last``."""
    from streamproc.execution.task import TaskOutput
    from streamproc.io.error_ledger import ErrorLedger
    from streamproc.options import ProcessingOptions
    from streamproc.stats import TaskStats

    options = ProcessingOptions().updated(on_error="dead_letter", dead_letter_path=str(tmp_path), max_errors=0.9)
    ledger = ErrorLedger(options, DeadLetterWriter(tmp_path, "new"))

    def output(key: int, errors: tuple[RecordError, ...], last: bool) -> TaskOutput:
        return TaskOutput(4, (), 0, TaskStats(extra={"records_in": 10}), last, key, errors)

    ledger.add(output(12, (), False))
    ledger.add(output(13, (error(13, "a"), error(13, "b")), False))
    assert os.listdir(tmp_path) == []  # the group is not complete yet
    ledger.add(output(14, (error(14, "c"),), True))
    files = read_dead_letters(tmp_path)
    assert {name: [r["message"] for r in rows] for name, rows in files.items()} == {
        "dead-00000013.parquet": ["a", "b"],
        "dead-00000014.parquet": ["c"],
    }
    assert (ledger.total, ledger.records_seen) == (3, 30)


def test_dead_letter_mode_of_a_sink():
    from streamproc.io.error_ledger import dead_letter_mode_of
    from streamproc.io.sinks import JsonlSink, ListSink

    assert dead_letter_mode_of(ListSink()) == "new"
    assert dead_letter_mode_of(JsonlSink("out.jsonl", overwrite=True)) == "overwrite"
    assert dead_letter_mode_of(JsonlSink("out.jsonl", overwrite=False)) == "new"
    resuming = ListSink()
    resuming.dead_letter_mode = "resume"  # type: ignore[attr-defined]
    assert dead_letter_mode_of(resuming) == "resume"
