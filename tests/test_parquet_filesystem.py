"""write_parquet(filesystem=...): through fsspec's memory filesystem (an object store stand-in:
its move is a copy and a delete, so the manifest is the commit) and pyarrow filesystems."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.io.parquet_writer import ParquetOutput
from tests.hang_guard import run_guarded
from tests.parquet_dirs import MANIFEST, doubled, snapshot
from tests.utils import config_id, in_process_configs

fsspec = pytest.importorskip("fsspec")

#: The main process writes: configurations whose writer runs in this process (the memory
#: filesystem lives in it), a multiprocessing one included (its workers only convert).
MAIN_WRITER_CONFIGS = [*in_process_configs(), {"backend": "multiprocessing", "num_cpu_workers": 2}]
LAYOUT = {"rows_per_file": 20, "row_group_size": 8}
GUARD_S = 120


def _records(n: int = 100) -> list[dict[str, Any]]:
    return [{"x": i, "s": f"r{i}"} for i in range(n)]


@pytest.fixture
def memory_root(tmp_path: Any) -> Iterator[tuple[Any, str]]:
    fs = fsspec.filesystem("memory")
    root = f"/streamproc-write-{os.getpid()}-{tmp_path.name}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _memory_snapshot(fs: Any, root: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for path in sorted(fs.ls(root, detail=False)):
        name = path.rsplit("/", 1)[-1]
        with fs.open(path, "rb") as f:
            result[name] = pq.read_table(f).to_pylist() if name.endswith(".parquet") else json.loads(f.read())["parts"]
    return result


@pytest.mark.parametrize("config", MAIN_WRITER_CONFIGS, ids=config_id)
def test_write_and_resume_on_a_memory_filesystem(memory_root, tmp_path, config, monkeypatch):
    fs, root = memory_root
    stream = sp.from_iterable(_records()).map(doubled).set_processing(task_size=10, **config)
    reference = sp.from_iterable(_records()).map(doubled).set_processing(task_size=10)
    run_guarded(lambda: reference.write_parquet(f"{root}/reference", filesystem=fs, **LAYOUT), GUARD_S, "reference")
    expected = _memory_snapshot(fs, f"{root}/reference")
    assert list(expected) == [MANIFEST] + [f"part-{k:06d}.parquet" for k in range(0, 10, 2)]
    # Interrupted after 2 commits, then resumed: the uninterrupted output.
    record = ParquetOutput.record
    seen: list[int] = []

    def interrupted(self: ParquetOutput, entry: Any) -> None:
        record(self, entry)
        seen.append(entry.group)
        if len(seen) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ParquetOutput, "record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_guarded(lambda: stream.write_parquet(f"memory://{root}/out", filesystem=fs, **LAYOUT), GUARD_S, "write")
    monkeypatch.setattr(ParquetOutput, "record", record)
    paths = run_guarded(lambda: stream.write_parquet(f"{root}/out", filesystem=fs, resume=True, **LAYOUT), GUARD_S, "resume")
    assert paths == [f"{root}/out/part-{k:06d}.parquet" for k in range(0, 10, 2)]
    assert _memory_snapshot(fs, f"{root}/out") == expected
    assert sp.read_parquet(f"{root}/out", filesystem=fs).to_list() == [doubled(r) for r in _records()]


def test_a_part_the_manifest_does_not_list_does_not_count(memory_root):
    # On an object store a part may exist under its final name without being committed (the
    # run died between the copy and the manifest): resume writes it again.
    fs, root = memory_root
    stream = sp.from_iterable(_records(40)).map(doubled).set_processing(task_size=10)
    stream.write_parquet(root, filesystem=fs, **LAYOUT)
    expected = _memory_snapshot(fs, root)
    manifest = json.loads(fs.cat(f"{root}/{MANIFEST}"))
    manifest["parts"], manifest["complete"] = manifest["parts"][:1], False
    fs.pipe(f"{root}/{MANIFEST}", json.dumps(manifest).encode())
    fs.pipe(f"{root}/part-000002.parquet", b"a copy that never completed")
    sp.from_iterable(_records(40)).map(doubled).set_processing(task_size=10).write_parquet(
        root, filesystem=fs, resume=True, **LAYOUT
    )
    assert _memory_snapshot(fs, root) == expected


def test_a_memory_filesystem_is_written_by_the_main_process_also_unordered(memory_root):
    # No worker process can reach a memory filesystem: the main process writes, in task order.
    fs, root = memory_root
    options = {"backend": "multiprocessing", "num_cpu_workers": 2, "deterministic": False, "task_size": 10}
    stream = sp.from_iterable(_records()).map(doubled).set_processing(**options)
    reference = sp.from_iterable(_records()).map(doubled).set_processing(task_size=10)
    run_guarded(lambda: reference.write_parquet(f"{root}/reference", filesystem=fs, **LAYOUT), GUARD_S, "reference")
    run_guarded(lambda: stream.write_parquet(f"{root}/out", filesystem=fs, **LAYOUT), GUARD_S, "unordered")
    assert _memory_snapshot(fs, f"{root}/out") == _memory_snapshot(fs, f"{root}/reference")


@pytest.mark.parametrize("make_fs", [pafs.LocalFileSystem, lambda: fsspec.filesystem("file")], ids=["pyarrow", "fsspec"])
def test_local_filesystems_write_the_default_output(tmp_path, make_fs):
    stream = sp.from_iterable(_records()).map(doubled).set_processing(task_size=10)
    stream.write_parquet(tmp_path / "default", **LAYOUT)
    paths = stream.write_parquet(str(tmp_path / "through"), filesystem=make_fs(), **LAYOUT)
    assert [os.path.basename(p) for p in paths] == [f"part-{k:06d}.parquet" for k in range(0, 10, 2)]
    assert snapshot(tmp_path / "through") == snapshot(tmp_path / "default")
