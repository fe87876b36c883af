"""Per-worker state: classes passed to map/map_batches/map_gpu, built once per worker, and
``sp.get_worker_info()`` (kind, index, rank, device, a per-task seed).

Constructions are counted with one file per construction (named by process and thread), not
with globals, which worker processes do not share. Every run goes through the hang guard.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

import pytest

import streamproc as sp
from tests.hang_guard import run_guarded
from tests.utils import assert_same_as_simple, effective_backend

RUN_TIMEOUT_S = 120
RECORDS = list(range(40))
TASK_SIZE = 4


def _mark(directory: str, what: str) -> None:
    """Records one construction in ``directory``: ``<pid>-<thread id>-<what>-<unique>``."""
    name = f"{os.getpid()}-{threading.get_ident()}-{what}-{uuid.uuid4().hex}"
    Path(directory, name).write_text(repr(sp.get_worker_info()))


def _constructions(directory: Path, what: str) -> list[tuple[int, int, str]]:
    """``(pid, thread id, worker kind)`` of each construction of ``what`` recorded in ``directory``."""
    found = []
    for path in directory.iterdir():
        pid, thread, role, _ = path.name.split("-")
        if role == what:
            kind = path.read_text().split("kind='")[1].split("'")[0]
            found.append((int(pid), int(thread), kind))
    return found


class AddOffset:
    """A map class: constructed once per worker with ``offset``, then called per record."""

    def __init__(self, directory: str, offset: int) -> None:
        _mark(directory, "map")
        self.offset = offset

    def __call__(self, record: int, scale: int = 1) -> int:
        return record * scale + self.offset


class SumBatch:
    def __init__(self, directory: str) -> None:
        _mark(directory, "batches")

    def __call__(self, batch: list[int]) -> list[int]:
        return [sum(batch)]


class NoisyRecord:
    """A stochastic op: one generator per task, seeded from the task's seed."""

    def __init__(self) -> None:
        self.task_key: Optional[int] = None
        self.rng = random.Random()

    def __call__(self, record: int) -> tuple[int, float]:
        info = sp.get_worker_info()
        if info.task_key != self.task_key:
            self.task_key, self.rng = info.task_key, random.Random(info.seed)
        return record, self.rng.random()


def where_it_runs(record: int) -> tuple[int, str, int, int, Optional[str]]:
    info = sp.get_worker_info()
    return record, info.kind, info.index, info.rank, info.device


@dataclasses.dataclass(frozen=True)
class Point:
    """A record class (no ``__call__``): ``map(Point)`` builds one per record."""

    x: str


class NotCallable:
    def __init__(self, value: int = 0) -> None:
        self.value = value


class FailingConstructor:
    def __init__(self) -> None:
        raise ValueError("cannot open the connection")

    def __call__(self, record: Any) -> Any:
        return record


def run(stream: sp.Stream, what: str) -> list[Any]:
    return run_guarded(stream.to_list, RUN_TIMEOUT_S, what)


def test_map_and_map_batches_classes_are_built_once_per_worker(backend_options: dict[str, Any], tmp_path: Path) -> None:
    stream = (
        sp.from_iterable(RECORDS)
        .map(AddOffset, kwargs={"scale": 2}, fn_kwargs={"directory": str(tmp_path), "offset": 1000})
        .map_batches(SumBatch, batch_size=2, fn_kwargs={"directory": str(tmp_path)})
        .set_processing(task_size=TASK_SIZE)
    )
    out = run_guarded(lambda: assert_same_as_simple(stream, **backend_options), RUN_TIMEOUT_S, "per-worker classes")
    assert out == [(2 * a + 1000) + (2 * (a + 1) + 1000) for a in RECORDS[::2]]
    backend = effective_backend(backend_options)
    for what in ("map", "batches"):
        made = _constructions(tmp_path, what)
        in_main = [m for m in made if m[2] == "main"]
        others = [m for m in made if m[2] != "main"]
        # Each simple run (the reference, and the run under test if simple) built it once, here.
        assert len(in_main) == (2 if backend == "simple" else 1)
        assert all(pid == os.getpid() for pid, _, _ in in_main)
        assert len(set(others)) == len(others), f"{what}: a worker built its instance twice: {others}"
        if backend == "multiprocessing":
            assert others and all(pid != os.getpid() and kind == "cpu" for pid, _, kind in others)
            assert len(others) <= backend_options["num_cpu_workers"]
        elif backend == "threads":
            assert others and all(pid == os.getpid() and kind == "thread" for pid, _, kind in others)
            assert len(others) <= backend_options["num_cpu_workers"]


def test_stochastic_op_seeded_from_the_task_is_the_same_for_any_worker_count(backend_options: dict[str, Any]) -> None:
    stream = sp.from_iterable(RECORDS).map(NoisyRecord).set_processing(task_size=TASK_SIZE)
    out = run_guarded(lambda: assert_same_as_simple(stream, **backend_options), RUN_TIMEOUT_S, "seeded op")
    assert [record for record, _ in out] == RECORDS
    assert len({noise for _, noise in out}) == len(RECORDS)  # really random within and across tasks
    if backend_options.get("num_cpu_workers", 1) != 2:
        two = {**backend_options, "num_cpu_workers": 2}
        assert run(stream.set_processing(**two), "seeded op, 2 workers") == out


def test_the_seed_is_the_task_keys_not_the_workers() -> None:
    from streamproc.execution.worker_info import task_seed

    def seed_of_task(record: int) -> tuple[int, Optional[int], Optional[int]]:
        info = sp.get_worker_info()
        return record, info.task_key, info.seed

    out = sp.from_iterable(range(8)).map(seed_of_task).set_processing(task_size=2).to_list()
    assert [(r, key, seed) for r, key, seed in out] == [(r, r // 2, task_seed(r // 2)) for r in range(8)]
    assert len({seed for _, _, seed in out}) == 4


def test_worker_info_kind_and_index_per_backend(backend_options: dict[str, Any]) -> None:
    stream = sp.from_iterable(RECORDS).map(where_it_runs).set_processing(task_size=TASK_SIZE, **backend_options)
    out = run(stream, "worker info")
    assert [row[0] for row in out] == RECORDS
    backend = effective_backend(backend_options)
    workers = backend_options.get("num_cpu_workers", 1)
    expected_kind = {"simple": "main", "threads": "thread", "multiprocessing": "cpu", "ray": "cpu"}[backend]
    assert {row[1] for row in out} == {expected_kind}
    assert {row[2] for row in out} <= set(range(workers))
    assert {row[3] for row in out} == {0}  # not sharded
    assert {row[4] for row in out} == {None}  # no map_gpu stage: forward runs nowhere


def test_get_worker_info_outside_a_run_raises() -> None:
    with pytest.raises(RuntimeError, match=r"only valid inside a running op"):
        sp.get_worker_info()
    # Nor while the main program iterates over a simple-backend stream (between records).
    for _ in sp.from_iterable(range(3)).map(where_it_runs).set_processing(backend="simple"):
        with pytest.raises(RuntimeError, match=r"only valid inside a running op"):
            sp.get_worker_info()


class ScaleForward:
    """A forward class holding a module: built once per process that runs forward."""

    def __init__(self, directory: str, factor: float) -> None:
        import torch

        _mark(directory, "forward")
        self.linear = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.linear.weight.fill_(factor)
        self.linear.train()  # DeviceForward puts found modules in eval mode

    def __call__(self, batch: Any) -> Any:
        assert not self.linear.training
        return self.linear(batch.unsqueeze(1)).squeeze(1)


class Prepare:
    def __init__(self, directory: str) -> None:
        _mark(directory, "prepare")

    def __call__(self, records: list[float]) -> Any:
        import torch

        return torch.tensor(records, dtype=torch.float32)


def _as_float(records: list[float], outputs: Any) -> list[float]:
    return [float(x) for x in outputs]


@pytest.mark.parametrize(
    "config",
    [
        {"backend": "simple"},
        {"backend": "threads", "num_cpu_workers": 2},
        {"backend": "multiprocessing", "num_cpu_workers": 1},
        {"backend": "multiprocessing", "num_cpu_workers": 2, "num_gpu_workers": 1, "gpu_worker_devices": ["cpu"]},
    ],
    ids=["simple", "threads", "mp-forward-in-cpu-workers", "mp-gpu-worker"],
)
def test_map_gpu_with_classes(config: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("torch")
    directory = str(tmp_path)
    stream = (
        sp.from_iterable([float(x) for x in range(16)])
        .map_gpu(
            Prepare, ScaleForward, _as_float, batch_size=4,
            fn_kwargs={"prepare_batch": {"directory": directory}, "forward": {"directory": directory, "factor": 3.0}},
        )
        .set_processing(task_size=TASK_SIZE)
    )
    out = run_guarded(lambda: assert_same_as_simple(stream, **config), RUN_TIMEOUT_S, "map_gpu classes")
    assert out == [3.0 * x for x in range(16)]
    forwards = [path.read_text() for path in tmp_path.iterdir() if "-forward-" in path.name]
    prepares = _constructions(tmp_path, "prepare")
    backend = effective_backend(config)
    in_workers = [m for m in prepares if m[2] != "main"]
    assert len(set(in_workers)) == len(in_workers)  # once per CPU worker or thread
    assert len(prepares) - len(in_workers) == (2 if backend == "simple" else 1)  # once per simple run
    if backend == "threads":
        assert len(forwards) == 2  # one shared by the threads, one for the simple reference run
    elif config.get("num_gpu_workers"):
        on_gpu_worker = [text for text in forwards if "kind='gpu'" in text]
        assert len(on_gpu_worker) == 1 and "device='cpu'" in on_gpu_worker[0]
    elif backend == "multiprocessing":  # forward in each CPU worker that ran a task, on its CPU
        assert sum("kind='cpu'" in text and "device='cpu'" in text for text in forwards) == 1


def test_fn_kwargs_need_a_class() -> None:
    stream = sp.from_iterable(range(3))
    with pytest.raises(TypeError, match=r"map\(\): fn_kwargs .* 'where_it_runs' is not a class"):
        stream.map(where_it_runs, fn_kwargs={"x": 1})
    with pytest.raises(TypeError, match=r"map_batches\(\) stage 1: instances of fn class 'NotCallable' are not callable"):
        stream.map_batches(NotCallable, fn_kwargs={"value": 1})
    with pytest.raises(TypeError, match=r"fn_kwargs must be a dict or None, got list"):
        stream.map(AddOffset, fn_kwargs=["x"])  # type: ignore[arg-type]


def test_map_gpu_fn_kwargs_are_by_role() -> None:
    stream = sp.from_iterable(range(3))
    with pytest.raises(TypeError, match=r"dict by role .* unknown key\(s\) \['factor'\]"):
        stream.map_gpu(Prepare, ScaleForward, fn_kwargs={"factor": 2.0})
    with pytest.raises(TypeError, match=r"fn_kwargs\['postprocess'\] given but no postprocess was passed"):
        stream.map_gpu(Prepare, ScaleForward, fn_kwargs={"postprocess": {}})
    with pytest.raises(TypeError, match=r"'_as_float' is not a class"):
        stream.map_gpu(Prepare, ScaleForward, _as_float, fn_kwargs={"postprocess": {"x": 1}})


def test_classes_without_call_are_still_called_per_record() -> None:
    out = sp.from_iterable(range(3)).map(str).map(Point).map_batches(list, batch_size=2).to_list()
    assert out == [Point("0"), Point("1"), Point("2")]


@pytest.mark.parametrize(
    "config", [{"backend": "simple"}, {"backend": "multiprocessing", "num_cpu_workers": 1}], ids=["simple", "mp"]
)
def test_a_failing_constructor_names_the_stage_and_the_class(config: dict[str, Any]) -> None:
    stream = sp.from_iterable(range(3)).map(lambda x: x).map(FailingConstructor).set_processing(**config)
    with pytest.raises(ValueError, match="cannot open the connection") as info:
        run(stream, "failing constructor")
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "constructor of FailingConstructor (stage 2 (map(FailingConstructor)), fn)" in notes


def _rank_key_seed(record: int) -> tuple[int, int, Optional[int], Optional[int]]:
    info = sp.get_worker_info()
    return record, info.rank, info.task_key, info.seed


def test_a_shard_sees_its_rank_and_the_unsharded_tasks_seeds(backend_options: dict[str, Any]) -> None:
    whole = sp.from_iterable(range(16)).map(_rank_key_seed).set_processing(task_size=2)
    unsharded = {record: seed for record, _, _, seed in run(whole.set_processing(**backend_options), "unsharded")}
    shard = run(whole.set_processing(shard=(1, 2), **backend_options), "shard 1 of 2")
    assert shard and {rank for _, rank, _, _ in shard} == {1}
    # The same task (key) gets the same seed in the shard as in the whole job.
    assert all(seed == unsharded[record] for record, _, _, seed in shard)
