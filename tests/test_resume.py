"""write_parquet(resume=True): completes an interrupted write into the uninterrupted run's directory,
skipping committed parts unread, refusing a changed input or layout; ranks keep to their parts."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
import streamproc.stream as stream_module
from streamproc.execution.selection import TaskSelection
from streamproc.io.parquet_writer import ParquetOutput
from streamproc.io.sinks import ParquetSink
from tests.hang_guard import run_guarded
from tests.parquet_dirs import (
    MANIFEST,
    FailsWhileFileExists,
    RaisesBelow,
    doubled,
    manifest_parts,
    mark_incomplete,
    snapshot,
)
from tests.utils import BACKEND_CONFIGS, config_id

WRITER_CONFIGS = [
    *BACKEND_CONFIGS,
    {"backend": "multiprocessing", "num_cpu_workers": 2, "deterministic": False},
]
GUARD_S = 120
N = 120
#: 10 records per task, 2 tasks per part: 6 parts of 20 rows.
LAYOUT = {"rows_per_file": 20, "row_group_size": 8}


def _records(n: int = N) -> list[dict[str, Any]]:
    return [{"x": i, "s": f"r{i}"} for i in range(n)]


def _write(stream: sp.Stream, out: Any, **kwargs: Any) -> list[str]:
    paths: list[str] = run_guarded(lambda: stream.write_parquet(out, **{**LAYOUT, **kwargs}), GUARD_S, "write_parquet")
    return paths


def _reference(tmp_path: Any) -> dict[str, Any]:
    _write(sp.from_iterable(_records()).map(doubled).set_processing(task_size=10), tmp_path / "reference")
    return snapshot(tmp_path / "reference")


def test_resume_on_a_missing_or_empty_directory_just_runs(tmp_path):
    expected = _reference(tmp_path)
    stream = sp.from_iterable(_records()).map(doubled).set_processing(task_size=10)
    _write(stream, tmp_path / "missing", resume=True)
    (tmp_path / "empty").mkdir()
    _write(stream, tmp_path / "empty", resume=True)
    assert snapshot(tmp_path / "missing") == expected == snapshot(tmp_path / "empty")


@pytest.mark.parametrize("config", WRITER_CONFIGS, ids=config_id)
def test_resume_after_an_error_completes_the_uninterrupted_output(tmp_path, config):
    expected = _reference(tmp_path)
    flag = tmp_path / "failing"
    flag.write_text("")
    stream = sp.from_iterable(_records()).map(FailsWhileFileExists(str(flag), at=77)).set_processing(task_size=10, **config)
    with pytest.raises(RuntimeError, match="failing at 77"):
        _write(stream, tmp_path / "out")
    committed = manifest_parts(tmp_path / "out")
    assert 77 // 20 not in [p["group"] for p in committed]  # the failing part never commits
    flag.unlink()
    paths = _write(stream, tmp_path / "out", resume=True)
    assert snapshot(tmp_path / "out") == expected
    assert [os.path.basename(p) for p in paths] == [f"part-{k:06d}.parquet" for k in range(0, 12, 2)]


@pytest.mark.parametrize("config", WRITER_CONFIGS, ids=config_id)
def test_ctrl_c_in_the_consumer_then_resume(tmp_path, config, monkeypatch):
    # KeyboardInterrupt in the main process right after the 3rd part commit (in the consumer,
    # whichever process wrote the part), as a Ctrl-C there would.
    expected = _reference(tmp_path)
    record = ParquetOutput.record
    commits: list[int] = []

    def interrupted_record(self: ParquetOutput, entry: Any) -> None:
        record(self, entry)
        commits.append(entry.group)
        if len(commits) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ParquetOutput, "record", interrupted_record)
    stream = sp.from_iterable(_records()).map(doubled).set_processing(task_size=10, **config)
    with pytest.raises(KeyboardInterrupt):
        _write(stream, tmp_path / "out")
    assert sorted(p["group"] for p in manifest_parts(tmp_path / "out")) == sorted(commits)
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".inprogress")]
    monkeypatch.setattr(ParquetOutput, "record", record)
    _write(stream, tmp_path / "out", resume=True)
    assert snapshot(tmp_path / "out") == expected


@pytest.mark.parametrize("config", [BACKEND_CONFIGS[0], BACKEND_CONFIGS[2], WRITER_CONFIGS[-1]], ids=config_id)
def test_committed_parquet_row_groups_are_not_read_again(tmp_path, config):
    pq.write_table(pa.table({"x": list(range(N)), "s": [f"r{i}" for i in range(N)]}), tmp_path / "in.parquet", row_group_size=10)
    reference = sp.read_parquet(tmp_path / "in.parquet").map(doubled).set_processing(task_size=10)
    _write(reference, tmp_path / "reference")
    partial = sp.read_parquet(tmp_path / "in.parquet").map(doubled).set_processing(task_size=10)
    # Only the first 3 parts, as if the run had died: the same layout, a source cut short.
    cut = sp.from_iterable(_records(60)).map(doubled).set_processing(task_size=10)
    _write(cut, tmp_path / "out")
    manifest = tmp_path / "out" / MANIFEST
    text = manifest.read_text().replace('"fingerprint": null', f'"fingerprint": {_json(partial.source.fingerprint())}')
    text = text.replace('"complete": true', '"complete": false')  # the cut run reached its end, not the input's
    manifest.write_text(text)
    # Any record of the 60 committed rows processed again raises.
    resumed = sp.read_parquet(tmp_path / "in.parquet").map(RaisesBelow(60)).set_processing(task_size=10, **config)
    _write(resumed, tmp_path / "out", resume=True)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "reference")


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def test_resume_of_complete_output_runs_nothing(tmp_path):
    stream = sp.from_iterable(_records()).map(doubled).set_processing(task_size=10)
    first = _write(stream, tmp_path / "out")
    before = snapshot(tmp_path / "out")
    again = sp.from_iterable(_records()).map(RaisesBelow(N)).set_processing(task_size=10)
    assert _write(again, tmp_path / "out", resume=True) == first
    assert snapshot(tmp_path / "out") == before


def test_uncommitted_files_are_removed_and_other_files_kept(tmp_path):
    expected = _reference(tmp_path)
    out = tmp_path / "out"
    _write(sp.from_iterable(_records(40)).map(doubled).set_processing(task_size=10), out)  # parts 0 and 1
    mark_incomplete(out)
    (out / "part-000004.parquet").write_bytes(b"written, never recorded")
    (out / ".part-000006.parquet.inprogress").write_bytes(b"half")
    (out / "part-000099.parquet").write_bytes(b"a stray part of no group")
    (out / "notes.txt").write_text("mine")
    _write(sp.from_iterable(_records()).map(doubled).set_processing(task_size=10), out, resume=True)
    assert snapshot(out) == {**expected, "notes.txt": b"mine"}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"task_size": 12}, "task_size was 10, it is 12"),
        ({"rows_per_file": 30}, "rows_per_file was 20, it is 30"),
        ({"row_group_size": 5}, "row_group_size was 8, it is 5"),
    ],
    ids=["task_size", "rows_per_file", "row_group_size"],
)
def test_changed_layout_is_refused(tmp_path, change, match):
    def stream(task_size: int = 10) -> sp.Stream:
        failing = FailsWhileFileExists(str(tmp_path / "flag"), at=77)
        return sp.from_iterable(_records()).map(failing).set_processing(task_size=task_size)

    (tmp_path / "flag").write_text("")
    with pytest.raises(RuntimeError):
        _write(stream(), tmp_path / "out")
    before = snapshot(tmp_path / "out")
    kwargs = {k: v for k, v in change.items() if k != "task_size"}
    with pytest.raises(sp.ResumeMismatchError, match=match):
        _write(stream(change.get("task_size", 10)), tmp_path / "out", resume=True, **kwargs)
    assert snapshot(tmp_path / "out") == before  # nothing touched


def test_changed_input_is_refused_naming_the_file(tmp_path):
    pq.write_table(pa.table({"x": list(range(N))}), tmp_path / "in.parquet", row_group_size=10)
    (tmp_path / "flag").write_text("")
    stream = sp.read_parquet(tmp_path / "in.parquet").map(FailsWhileFileExists(str(tmp_path / "flag"), at=77))
    with pytest.raises(RuntimeError):
        _write(stream.set_processing(task_size=10), tmp_path / "out")
    pq.write_table(pa.table({"x": list(range(N + 5))}), tmp_path / "in.parquet", row_group_size=10)
    changed = sp.read_parquet(tmp_path / "in.parquet").map(doubled).set_processing(task_size=10)
    with pytest.raises(sp.ResumeMismatchError, match=r"in\.parquet: .*rows 120 -> 125"):
        _write(changed, tmp_path / "out", resume=True)
    pq.write_table(pa.table({"x": list(range(N))}), tmp_path / "other.parquet", row_group_size=10)
    added = sp.read_parquet([tmp_path / "in.parquet", tmp_path / "other.parquet"]).map(doubled).set_processing(task_size=10)
    with pytest.raises(sp.ResumeMismatchError, match=r"other\.parquet is new"):
        _write(added, tmp_path / "out", resume=True)


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="overwrite=True and resume=True"):
        sp.from_iterable(_records()).write_parquet(tmp_path / "out", overwrite=True, resume=True)


def test_dead_letters_resume_with_the_output(tmp_path):
    # The dead-letter writer is told how this run treats what an earlier one wrote.
    assert ParquetSink(tmp_path, False, None, 10, 10, resume=True).dead_letter_mode == "resume"
    assert ParquetSink(tmp_path, True, None, 10, 10).dead_letter_mode == "overwrite"
    assert ParquetSink(tmp_path, False, None, 10, 10).dead_letter_mode == "new"


# -- ranks ---------------------------------------------------------------------------------------


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world_size: int) -> None:
    """Runs the next write_parquet as shard ``rank`` of ``world_size`` (what ``shard=`` builds)."""
    build = stream_module.build_plan

    def sharded(stream: sp.Stream) -> Any:
        return dataclasses.replace(build(stream), task_selection=TaskSelection(rank=rank, world_size=world_size))

    monkeypatch.setattr(stream_module, "build_plan", sharded)


def test_ranks_write_resume_and_overwrite_only_their_parts(tmp_path, monkeypatch):
    expected = _reference(tmp_path)
    out = tmp_path / "out"
    stream = sp.from_iterable(_records()).map(doubled).set_processing(task_size=10)
    for rank in range(3):
        _as_rank(monkeypatch, rank, 3)
        paths = _write(stream, out)
        assert [os.path.basename(p) for p in paths] == [f"part-{2 * g:06d}.parquet" for g in (rank, rank + 3)]
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith("_")] == [f"_streamproc_manifest.{r}-of-3.json" for r in range(3)]
    # The union of the ranks' parts is the unsharded output.
    assert {k: v for k, v in snapshot(out).items() if k.endswith(".parquet")} == {
        k: v for k, v in expected.items() if k.endswith(".parquet")
    }
    before = snapshot(out)
    # Rank 1 again, without overwrite: refused; with overwrite: only its own files change.
    _as_rank(monkeypatch, 1, 3)
    with pytest.raises(FileExistsError, match="not empty"):
        _write(stream, out)
    _write(sp.from_iterable(_records()).set_processing(task_size=10), out, overwrite=True)
    after = snapshot(out)
    mine = {"part-000002.parquet", "part-000008.parquet", "_streamproc_manifest.1-of-3.json"}
    assert {k: v for k, v in after.items() if k not in mine} == {k: v for k, v in before.items() if k not in mine}
    assert after["part-000002.parquet"] != before["part-000002.parquet"]  # no "y" column now
    # Rank 2 resumes: all committed, nothing rewritten; rank 0's stray files are not its business.
    (out / ".part-000000.parquet.inprogress").write_bytes(b"rank 0's")
    _as_rank(monkeypatch, 2, 3)
    _write(stream, out, resume=True)
    assert (out / ".part-000000.parquet.inprogress").read_bytes() == b"rank 0's"
    assert snapshot(out) == {**after, ".part-000000.parquet.inprogress": b"rank 0's"}


def test_a_listed_part_that_was_deleted_is_written_again(tmp_path):
    stream = sp.from_iterable(_records()).map(doubled).set_processing(task_size=10)
    _write(stream, tmp_path / "out")
    before = snapshot(tmp_path / "out")
    os.unlink(tmp_path / "out" / "part-000004.parquet")
    again = sp.from_iterable(_records()).map(RaisesBelow(40)).set_processing(task_size=10)  # groups 0, 1 stay skipped
    _write(again, tmp_path / "out", resume=True)
    assert snapshot(tmp_path / "out") == before
