"""write_parquet with deterministic=True on the multiprocessing backend: the CPU workers write
the parts, the main process only coordinates, and the directory equals the simple backend's.

"Equals" is checked on the bytes of every file (parts and manifest), and again through
pyarrow (rows in order, schema, row group sizes: ``tests.parquet_dirs.snapshot``), with schema
evolution across parts (a field all null in the first parts, a field that appears later: the
main process rewrites earlier parts at the end), flatten/filter changing row counts (a group
with no row has no file), 1 to 3 workers, every start method, a user error mid-run, and a
SIGKILL of the whole job then a resume. That the main process holds no data is checked with a
spy on the sink (it only ever receives empty chunks and part entries) and on the main-process
part writer (never called), and through the run's stats (``writes_in_workers``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.io.manifest import PartEntry
from streamproc.io.parquet_writer import ParquetOutput
from streamproc.io.sinks import ParquetSink

from .hang_guard import run_guarded
from .parquet_dirs import manifest_parts, snapshot
from .resume_job import LAYOUT, N, build_stream
from .test_resume_kill import _finish, _kill_tree, _start_job, _wait_for_kill_point
from .utils import UserError

NUM_RECORDS = 300
TASK_SIZE = 10
#: 3 tasks (30 records before filtering) per part: 10 parts; row groups of 7 rows.
WRITE = {"rows_per_file": 30, "row_group_size": 7}
RUN_TIMEOUT_S = 120


def _record(i: int) -> dict[str, Any]:
    # "late" is None in the first parts and a float from record 100 on; "extra" appears at 200:
    # the final schema is known only at the end, and earlier parts are rewritten with it.
    record: dict[str, Any] = {"id": i, "text": "t" * (i % 5), "late": None if i < 100 else i / 2}
    if i >= 200:
        record["extra"] = [i, i + 1]
    return record


def _expand(record: dict[str, Any]) -> list[dict[str, Any]]:
    """0 to 2 outputs per record: ids 30-59 (all of part 1) produce none, so part 1 has no file."""
    if 30 <= record["id"] < 60 or record["id"] % 7 == 0:
        return []
    return [record, {**record, "id": -record["id"]}] if record["id"] % 3 == 0 else [record]


def _keep(record: dict[str, Any]) -> bool:
    return record["id"] % 4 != 1


def _fails_at_170(record: dict[str, Any]) -> dict[str, Any]:
    if record["id"] == 170:
        raise UserError("bad record 170")
    return record


def _stream(shape: str) -> sp.Stream:
    stream = sp.from_iterable([_record(i) for i in range(NUM_RECORDS)])
    if shape == "flatten-filter":
        stream = stream.map(_expand).flatten().filter(_keep)
    elif shape == "fails":
        stream = stream.map(_fails_at_170)
    return stream


def _write(stream: sp.Stream, out: Path, **options: Any) -> tuple[list[str], Any]:
    """Writes ``stream`` into ``out`` under the hang guard: the part paths and the run's stats."""
    ready = stream.set_processing(task_size=TASK_SIZE, **options)

    def write() -> tuple[list[str], Any]:
        with sp.collect_stats() as stats:  # stats are collected in the thread that runs
            paths = ready.write_parquet(out, **WRITE)
        return paths, stats.runs[-1]

    result: tuple[list[str], Any] = run_guarded(write, RUN_TIMEOUT_S, f"write_parquet {options}")
    return result


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


class _SinkSpy:
    """Counts what the main process's sink and its part writer receive (installed by monkeypatch)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chunks: list[Any] = []
        self.main_writes = 0
        sink_write, output_write = ParquetSink.write, ParquetOutput.write

        def spy_sink_write(sink: ParquetSink, output: Any) -> None:
            self.chunks.append(output.chunk)
            sink_write(sink, output)

        def spy_output_write(output: ParquetOutput, task_output: Any) -> None:
            self.main_writes += 1
            output_write(output, task_output)

        monkeypatch.setattr(ParquetSink, "write", spy_sink_write)
        monkeypatch.setattr(ParquetOutput, "write", spy_output_write)

    def assert_no_data_in_main_process(self) -> None:
        assert self.main_writes == 0
        assert self.chunks, "the sink received no output at all"
        assert all(chunk == () or isinstance(chunk, PartEntry) for chunk in self.chunks), {type(c) for c in self.chunks}
        entries = [chunk.group for chunk in self.chunks if isinstance(chunk, PartEntry)]
        assert entries == sorted(entries), f"parts recorded out of order: {entries}"


@pytest.fixture(scope="module")
def simple_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for shape in ("identity", "flatten-filter"):
        out = tmp_path_factory.mktemp(f"simple-{shape}") / "out"
        _write(_stream(shape), out, backend="simple")
        dirs[shape] = out
    return dirs


@pytest.mark.parametrize("shape", ["identity", "flatten-filter"])
@pytest.mark.parametrize("num_cpu_workers", [1, 2, 3])
def test_workers_write_the_simple_backends_directory(tmp_path, monkeypatch, simple_dirs, shape, num_cpu_workers):
    spy = _SinkSpy(monkeypatch)
    out = tmp_path / "out"
    paths, stats = _write(_stream(shape), out, backend="multiprocessing", num_cpu_workers=num_cpu_workers, deterministic=True)

    spy.assert_no_data_in_main_process()
    assert stats.writes_in_workers is True
    reference = simple_dirs[shape]
    assert [os.path.basename(p) for p in paths] == [p for p in sorted(os.listdir(reference)) if p.endswith(".parquet")]
    assert snapshot(out) == snapshot(reference)
    assert _file_bytes(out) == _file_bytes(reference)
    if shape == "flatten-filter":
        assert "part-000003.parquet" not in os.listdir(out)  # part 1 (tasks 3 to 5) produced no row
    schemas = {pq.read_schema(p) for p in paths}  # every part has the final schema
    assert len(schemas) == 1
    final = schemas.pop()
    assert final.names == ["id", "text", "late", "extra"]
    assert final.field("late").type == pa.float64() and final.field("extra").type.value_type == pa.int64()


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_every_start_method_writes_the_same_directory(tmp_path, monkeypatch, simple_dirs, start_method):
    spy = _SinkSpy(monkeypatch)  # under spawn/forkserver the workers do not even have the spy
    out = tmp_path / "out"
    _write(
        _stream("flatten-filter"), out,
        backend="multiprocessing", num_cpu_workers=2, deterministic=True, process_start_method=start_method,
    )
    spy.assert_no_data_in_main_process()
    assert _file_bytes(out) == _file_bytes(simple_dirs["flatten-filter"])


def test_a_failed_run_leaves_the_simple_backends_committed_parts(tmp_path, monkeypatch):
    """Record 170 fails (part 5): parts 0 to 4 are committed; parts after it that a worker
    completed meanwhile are not, and are dropped, so the directory equals the simple backend's."""
    simple_out, out = tmp_path / "simple", tmp_path / "out"
    with pytest.raises(UserError, match="bad record 170"):
        _write(_stream("fails"), simple_out, backend="simple")
    spy = _SinkSpy(monkeypatch)
    with pytest.raises(UserError, match="bad record 170"):
        _write(_stream("fails"), out, backend="multiprocessing", num_cpu_workers=3, deterministic=True)
    assert spy.main_writes == 0
    assert [p["group"] for p in manifest_parts(out)] == [0, 1, 2, 3, 4]
    assert _file_bytes(out) == _file_bytes(simple_out)


def test_runs_that_replace_workers_write_in_the_main_process(tmp_path, simple_dirs):
    out = tmp_path / "out"
    options = {"backend": "multiprocessing", "num_cpu_workers": 2, "deterministic": True, "max_task_retries": 1}
    _, stats = _write(_stream("identity"), out, **options)
    assert stats.writes_in_workers is False
    assert _file_bytes(out) == _file_bytes(simple_dirs["identity"])


def test_a_memory_filesystem_is_written_by_the_main_process():
    fsspec = pytest.importorskip("fsspec")
    fs = pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fsspec.filesystem("memory")))
    options = {"backend": "multiprocessing", "num_cpu_workers": 2, "deterministic": True, "task_size": TASK_SIZE}
    stream = _stream("identity").set_processing(**options)

    def write() -> tuple[list[str], Any]:
        with sp.collect_stats() as stats:
            paths = stream.write_parquet("/detwrite-out", filesystem=fs, **WRITE)
        return paths, stats.runs[-1]

    paths, stats = run_guarded(write, RUN_TIMEOUT_S, "write_parquet to a memory filesystem")
    assert stats.writes_in_workers is False
    assert len(paths) == NUM_RECORDS // WRITE["rows_per_file"]


def test_sigkill_then_resume_commits_in_order_and_ends_with_the_simple_directory(tmp_path):
    config = {"backend": "multiprocessing", "num_cpu_workers": 3, "deterministic": True}
    reference = tmp_path / "reference"
    run_guarded(lambda: build_stream({}).write_parquet(reference, **LAYOUT), RUN_TIMEOUT_S, "the reference write")
    out = tmp_path / "out"
    gate = N * 2 // 3  # record 160: part 8 of 12 blocks; the workers complete later parts meanwhile
    job = _start_job(out, config, gate, resume=False)
    try:
        _wait_for_kill_point(job, out, gate, commits=4)
    finally:
        _kill_tree(job)
        _finish(job)
    assert job.returncode == -signal.SIGKILL
    committed = [p["group"] for p in manifest_parts(out)]
    assert committed == list(range(len(committed))) and gate // 20 not in committed  # a prefix: in order
    code, err = _finish(_start_job(out, config, gate=-1, resume=True))
    assert code == 0, err[-3000:]
    assert snapshot(out) == snapshot(reference)
    assert _file_bytes(out) == _file_bytes(reference)


def test_a_parquet_source_gives_the_same_files_and_manifest(tmp_path):
    """A parquet input (one task per row group): its fingerprint goes into the manifest too."""
    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([_record(i) for i in range(NUM_RECORDS)]), source, row_group_size=TASK_SIZE)
    stream = sp.read_parquet(str(source)).map(_expand).flatten()
    _write(stream, tmp_path / "simple", backend="simple")
    _, stats = _write(stream, tmp_path / "out", backend="multiprocessing", num_cpu_workers=2, deterministic=True)
    assert stats.writes_in_workers is True
    assert _file_bytes(tmp_path / "out") == _file_bytes(tmp_path / "simple")
    assert len([name for name in os.listdir(tmp_path / "out") if name.endswith(".parquet")]) == 9  # part 1 is empty


@pytest.mark.parametrize(
    ("records", "deterministic", "in_workers"),
    [
        (NUM_RECORDS, True, True),  # 10 part groups for 3 workers
        (60, True, False),  # 2 part groups for 3 workers: one would sit idle
        (60, False, False),
    ],
)
def test_workers_write_only_when_every_worker_has_a_part_group(tmp_path, records, deterministic, in_workers):
    # A worker writes whole part groups: with fewer groups than workers, the main process
    # writes and every worker computes (the directory is the simple backend's either way).
    stream = sp.from_iterable([_record(i) for i in range(records)])
    _write(stream, tmp_path / "simple", backend="simple")
    options = {"backend": "multiprocessing", "num_cpu_workers": 3, "deterministic": deterministic}
    _, stats = _write(stream, tmp_path / "out", **options)
    assert stats.writes_in_workers is in_workers
    assert _file_bytes(tmp_path / "out") == _file_bytes(tmp_path / "simple")
    if not in_workers:
        assert sum(1 for w in stats.workers("cpu") if w.tasks > 0) >= 2  # the tasks were shared out


def test_a_source_of_unknown_size_is_written_by_the_main_process(tmp_path):
    stream = sp.from_iterable(_record(i) for i in range(NUM_RECORDS))  # a generator: no length
    _, stats = _write(stream, tmp_path / "out", backend="multiprocessing", num_cpu_workers=2)
    assert stats.writes_in_workers is False
