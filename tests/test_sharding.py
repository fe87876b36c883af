"""Rank sharding: shard="auto" | (rank, world_size), the plan's task selection, torchrun's device.

Ranks own part groups round-robin (design.md section 5); with one task per group (every sink
but write_parquet) rank r runs the tasks whose key k has k % world_size == r. The end-to-end
tests run the ranks in one process and, once, as separate processes launched like torchrun
and srun would (their environment variables), and check that the union of the ranks' outputs,
put back in task order, is the unsharded output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.backends.multiprocessing.topology import resolve_gpu_devices
from streamproc.execution.selection import TaskSelection
from streamproc.execution.sharding import resolve_shard, torchrun_local_device, torchrun_local_rank
from streamproc.io.sinks import ListSink, run_into
from streamproc.options import ProcessingOptions
from streamproc.plan import build_plan, task_selection_for
from tests.hang_guard import run_guarded
from tests.utils import assert_outputs, double, identity

GUARD_S = 120.0
#: Deadline of the three rank processes of one run (each imports streamproc and may start workers).
RANK_PROCESSES_TIMEOUT_S = 240.0
WORLD_SIZE = 3
N = 50
TASK_SIZE = 4
REPO_ROOT = Path(__file__).resolve().parent.parent

SHARD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture(autouse=True)
def clean_launcher_env(monkeypatch):
    """Tests start outside any launcher, whatever the environment running pytest is."""
    for name in SHARD_ENV:
        monkeypatch.delenv(name, raising=False)


def tasks_of(items: list[Any], task_size: int) -> list[list[Any]]:
    return [items[i : i + task_size] for i in range(0, len(items), task_size)]


def rank_share(items: list[Any], task_size: int, rank: int, world_size: int, tasks_per_group: int = 1) -> list[Any]:
    """What rank ``rank`` outputs of ``items`` (one output per input record, task by task)."""
    tasks = enumerate(tasks_of(items, task_size))
    return [x for key, task in tasks if (key // tasks_per_group) % world_size == rank for x in task]


def reassemble(per_rank: list[list[Any]], task_size: int, tasks_per_group: int = 1) -> list[Any]:
    """The ranks' outputs put back in task order (each task keeps ``task_size`` records)."""
    world_size = len(per_rank)
    group_rows = task_size * tasks_per_group
    groups = [tasks_of(rows, group_rows) for rows in per_rank]
    out: list[Any] = []
    for index in range(max(len(g) for g in groups) * world_size):
        rank, nth = index % world_size, index // world_size
        if nth < len(groups[rank]):
            out.extend(groups[rank][nth])
    return out


# -- resolving the shard ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, (0, 1)),
        ({"RANK": "2", "WORLD_SIZE": "3"}, (2, 3)),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, (1, 4)),
        # torchrun under srun: torchrun's RANK is the global rank, SLURM_PROCID the node's task.
        ({"RANK": "5", "WORLD_SIZE": "8", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (5, 8)),
        ({"RANK": "0", "WORLD_SIZE": "1"}, (0, 1)),
    ],
)
def test_auto_reads_the_launcher(environ, expected):
    assert resolve_shard("auto", environ) == expected


@pytest.mark.parametrize(
    "environ, match",
    [
        ({"RANK": "1"}, r"torchrun environment is incomplete \(RANK='1', WORLD_SIZE=None\)"),
        ({"SLURM_NTASKS": "2"}, r"Slurm environment is incomplete \(SLURM_PROCID=None, SLURM_NTASKS='2'\)"),
        ({"RANK": "one", "WORLD_SIZE": "2"}, r"torchrun environment is not a pair of integers"),
        ({"RANK": "3", "WORLD_SIZE": "3"}, r"inconsistent \(RANK='3', WORLD_SIZE='3'\): need 0 <= rank < world_size"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, r"Slurm environment is inconsistent"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, r"torchrun environment is inconsistent"),
    ],
)
def test_an_inconsistent_environment_is_a_clear_error(environ, match):
    with pytest.raises(ValueError, match=match):
        resolve_shard("auto", environ)


def test_explicit_and_no_shard_ignore_the_environment():
    environ = {"RANK": "1", "WORLD_SIZE": "2"}
    assert resolve_shard(None, environ) == (0, 1)
    assert resolve_shard((2, 5), environ) == (2, 5)


def test_an_inconsistent_environment_fails_when_the_run_starts(monkeypatch):
    stream = sp.from_iterable(range(3)).set_processing(shard="auto")  # set_processing reads no environment
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="shard='auto': torchrun environment is incomplete"):
        stream.to_list()


def test_local_rank():
    assert torchrun_local_rank({}) is None
    assert torchrun_local_device({"LOCAL_RANK": "2"}) == "cuda:2"
    with pytest.raises(ValueError, match="LOCAL_RANK='x' \\(torchrun\\) is not a non-negative integer"):
        torchrun_local_rank({"LOCAL_RANK": "x"})


# -- the plan's task selection --------------------------------------------------------------------


def test_no_shard_selects_every_task():
    assert build_plan(sp.from_iterable(range(3))).task_selection is None
    assert build_plan(sp.from_iterable(range(3)).set_processing(shard="auto")).task_selection is None


def test_a_shard_gives_one_task_per_group(monkeypatch):
    assert build_plan(sp.from_iterable(range(3)).set_processing(shard=(1, 3))).task_selection == TaskSelection(1, 1, 3)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert build_plan(sp.from_iterable(range(3)).set_processing(shard="auto")).task_selection == TaskSelection(1, 2, 4)


def test_with_task_selection_keeps_the_shard():
    plan = build_plan(sp.from_iterable(range(3)).set_processing(shard=(1, 2)))
    assert plan.with_task_selection(tasks_per_group=5, done_groups=[3]).task_selection == TaskSelection(5, 1, 2, frozenset({3}))
    unsharded = build_plan(sp.from_iterable(range(3)))
    assert unsharded.with_task_selection(tasks_per_group=5).task_selection is None
    assert unsharded.with_task_selection(5, [0]).task_selection == TaskSelection(5, 0, 1, frozenset({0}))
    with pytest.raises(ValueError, match="tasks_per_group must be a positive integer, got 0"):
        task_selection_for(ProcessingOptions(), tasks_per_group=0)


# -- ranks in this process, every backend --------------------------------------------------------


def test_ranks_union_to_the_unsharded_output(backend_options):
    items = list(range(N))
    stream = sp.from_iterable(items).map(double).set_processing(task_size=TASK_SIZE, **backend_options)
    per_rank = [
        run_guarded(stream.set_processing(shard=(rank, WORLD_SIZE)).to_list, GUARD_S, f"rank {rank}")
        for rank in range(WORLD_SIZE)
    ]
    for rank, records in enumerate(per_rank):
        assert_outputs(records, [2 * x for x in rank_share(items, TASK_SIZE, rank, WORLD_SIZE)], backend_options)
    if ProcessingOptions().updated(**backend_options).deterministic:
        assert reassemble(per_rank, TASK_SIZE) == run_guarded(stream.to_list, GUARD_S, "unsharded")


def test_groups_of_several_tasks_stay_on_one_rank(backend_options):
    # What write_parquet asks for: parts of 3 tasks, dealt to ranks whole.
    items = list(range(N))
    stream = sp.from_iterable(items).map(identity).set_processing(task_size=TASK_SIZE, **backend_options)
    per_rank = []
    for rank in range(WORLD_SIZE):
        plan = build_plan(stream.set_processing(shard=(rank, WORLD_SIZE))).with_task_selection(tasks_per_group=3)
        per_rank.append(run_guarded(lambda plan=plan: run_into(plan, ListSink()), GUARD_S, f"rank {rank}"))
    for rank, records in enumerate(per_rank):
        assert_outputs(records, rank_share(items, TASK_SIZE, rank, WORLD_SIZE, tasks_per_group=3), backend_options)
    assert sorted(x for records in per_rank for x in records) == items


def test_parquet_row_groups_are_sharded(backend_options, tmp_path):
    pq.write_table(pa.table({"x": list(range(N))}), tmp_path / "a.parquet", row_group_size=TASK_SIZE)
    stream = sp.read_parquet(tmp_path).set_processing(**backend_options)
    per_rank = [
        run_guarded(stream.set_processing(shard=(rank, WORLD_SIZE)).to_list, GUARD_S, f"rank {rank}")
        for rank in range(WORLD_SIZE)
    ]
    items = [{"x": x} for x in range(N)]
    for rank, records in enumerate(per_rank):
        assert_outputs(records, rank_share(items, TASK_SIZE, rank, WORLD_SIZE), backend_options)


# -- ranks as separate processes, as torchrun and srun start them ----------------------------------

RANK_SCRIPT = """
import json, sys
import streamproc as sp

def square(x):
    return x * x

config, out, sink = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
stream = sp.from_iterable(range({n})).map(square).set_processing(shard="auto", task_size={task_size}, **config)
if sink == "write_jsonl":
    stream.write_jsonl(out)
elif sink == "write_parquet":  # every rank into one directory
    stream.map(lambda v: {{"v": v}}).write_parquet(out, rows_per_file=2 * {task_size})
else:
    with open(out, "w") as f:
        json.dump(stream.to_list(), f)
"""


def run_rank_processes(tmp_path: Path, config: dict[str, Any], sink: str, launcher: str) -> list[list[Any]]:
    """Starts the ranks at once, each with its launcher's variables; returns each one's records."""
    outputs = [tmp_path / f"rank-{rank}.{'jsonl' if sink == 'write_jsonl' else 'json'}" for rank in range(WORLD_SIZE)]
    start_and_wait_ranks(tmp_path, config, outputs, sink, launcher)
    if sink == "write_jsonl":
        return [sp.read_jsonl(path).to_list() for path in outputs]
    return [json.loads(path.read_text(encoding="utf-8")) for path in outputs]


def start_and_wait_ranks(tmp_path: Path, config: dict[str, Any], outputs: list[Path], sink: str, launcher: str) -> None:
    """Runs RANK_SCRIPT as WORLD_SIZE processes started at once (rank r writes ``outputs[r]``)."""
    script = tmp_path / "job.py"
    script.write_text(RANK_SCRIPT.format(n=N, task_size=TASK_SIZE), encoding="utf-8")
    processes = []
    for rank in range(WORLD_SIZE):
        env = {k: v for k, v in os.environ.items() if k not in SHARD_ENV}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        if launcher == "torchrun":
            env.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
        else:
            env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(WORLD_SIZE))
        command = [sys.executable, str(script), json.dumps(config), str(outputs[rank]), sink]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        for rank, process in enumerate(processes):
            output, _ = process.communicate(timeout=RANK_PROCESSES_TIMEOUT_S)
            assert process.returncode == 0, f"rank {rank} failed:\n{output.decode(errors='replace')}"
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("sink", ["write_jsonl", "to_list"])
def test_three_rank_processes_union_to_the_unsharded_output(backend_options, tmp_path, sink):
    per_rank = run_guarded(
        lambda: run_rank_processes(tmp_path, backend_options, sink, "torchrun"), RANK_PROCESSES_TIMEOUT_S + 30, "3 ranks"
    )
    items = list(range(N))
    for rank, records in enumerate(per_rank):
        assert_outputs(records, [x * x for x in rank_share(items, TASK_SIZE, rank, WORLD_SIZE)], backend_options)
    if ProcessingOptions().updated(**backend_options).deterministic:
        assert reassemble(per_rank, TASK_SIZE) == [x * x for x in items]


def test_three_rank_processes_write_one_parquet_directory_equal_to_the_unsharded_one(tmp_path):
    """Ranks started at once write their own parts into one directory: the same files, with the
    same rows, as one unsharded run (part names are per group, so ranks never collide)."""
    import pyarrow.parquet as pq

    shared = tmp_path / "shared"
    run_guarded(
        lambda: start_and_wait_ranks(tmp_path, {"num_cpu_workers": 2}, [shared] * WORLD_SIZE, "write_parquet", "torchrun"),
        RANK_PROCESSES_TIMEOUT_S + 30,
        "3 ranks writing parquet",
    )
    whole = tmp_path / "whole"
    sp.from_iterable(range(N)).map(lambda x: {"v": x * x}).set_processing(task_size=TASK_SIZE).write_parquet(
        whole, rows_per_file=2 * TASK_SIZE
    )
    parts = sorted(p.name for p in whole.glob("part-*.parquet"))
    assert sorted(p.name for p in shared.glob("part-*.parquet")) == parts and len(parts) >= WORLD_SIZE
    for name in parts:
        assert pq.read_table(shared / name).to_pylist() == pq.read_table(whole / name).to_pylist(), name
    assert sorted(p.name for p in shared.glob("_streamproc_manifest*")) == [
        f"_streamproc_manifest.{rank}-of-{WORLD_SIZE}.json" for rank in range(WORLD_SIZE)
    ]


def test_three_slurm_tasks_union_to_the_unsharded_output(tmp_path):
    per_rank = run_guarded(
        lambda: run_rank_processes(tmp_path, {"backend": "simple"}, "to_list", "slurm"), RANK_PROCESSES_TIMEOUT_S + 30, "srun"
    )
    assert reassemble(per_rank, TASK_SIZE) == [x * x for x in range(N)]
    assert [len(records) for records in per_rank] == [len(rank_share(list(range(N)), TASK_SIZE, r, WORLD_SIZE)) for r in range(3)]


# -- torchrun's device ----------------------------------------------------------------------------


def gpu_plan(**options: Any) -> Any:
    stream = sp.from_iterable(range(3)).map_gpu(identity, identity).set_processing(**options)
    return build_plan(stream)


def test_gpu_workers_default_to_the_local_rank_device(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_gpu_devices(gpu_plan(), cuda_device_count=4) == ["cuda:1"]
    assert resolve_gpu_devices(gpu_plan(num_gpu_workers=2), cuda_device_count=4) == ["cuda:1", "cuda:1"]
    # An explicit list wins over torchrun's default.
    assert resolve_gpu_devices(gpu_plan(gpu_worker_devices=["cuda:3"]), cuda_device_count=4) == ["cuda:3"]
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 \(torchrun\) picks cuda:1 .* only 1 CUDA device"):
        resolve_gpu_devices(gpu_plan(), cuda_device_count=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no CUDA device is visible": the CPU fallback, as without torchrun
        assert resolve_gpu_devices(gpu_plan(num_gpu_workers=1), cuda_device_count=0) == ["cpu"]


def test_without_torchrun_gpu_workers_spread_over_devices():
    assert resolve_gpu_devices(gpu_plan(), cuda_device_count=2) == ["cuda:0", "cuda:1"]


def test_forward_default_device_is_the_local_rank_one(monkeypatch):
    torch = pytest.importorskip("torch")
    from streamproc.gpu.device import default_device

    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda:2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"


@pytest.mark.gpu
def test_forward_runs_on_the_local_rank_device_under_torchrun(monkeypatch):
    torch = pytest.importorskip("torch")
    local_rank = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))

    def device_of(batch: Any) -> Any:
        return torch.full((len(batch),), batch.device.index)

    stream = sp.from_iterable(range(6)).map_gpu(torch.tensor, device_of)
    assert [int(x) for x in stream.to_list()] == [local_rank] * 6


def test_module_doctests():
    import doctest

    from streamproc import plan
    from streamproc.execution import sharding

    assert doctest.testmod(sharding).failed == 0
    assert doctest.testmod(plan).failed == 0
