"""Several ``map_gpu`` models under ``gpu_memory_budget``, end to end on CPU devices.

Two stages with two different models of equal size, and a budget that holds one of them: the
output is the unbudgeted run's (and the simple backend's), and the swaps stay within the
bounds the code proves (``LocalForwardRunner``, ``RoundSchedule``): at most one swap per task
and stage where one process feeds the device. Models have small integer weights and inputs,
so every result is exact and compares with ``==``. Every run is under the hang guard, with
``collect_stats`` opened inside the guarded call (a context variable does not follow a new
thread); the autouse fixture of ``tests/conftest.py`` checks no process or thread is left.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

import streamproc as sp
from streamproc.gpu import model_nbytes
from streamproc.stats import RunStats
from tests.hang_guard import run_guarded
from tests.utils import assert_same_as_simple

torch = pytest.importorskip("torch")

RUN_TIMEOUT_S = 120
RECORDS = 40
TASK_SIZE = 8
TASKS = RECORDS // TASK_SIZE
GPU_STAGES = 2


class IntLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with small integer weights: exact in float32."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        with torch.no_grad():
            self.linear.weight.copy_(torch.arange(16, dtype=torch.float32).reshape(4, 4) % 5 - 2 + offset)
            self.linear.bias.copy_(torch.tensor([1.0, -1.0, 2.0, offset]))

    def forward(self, batch: Any) -> Any:
        return self.linear(batch).sum(dim=1)


MODEL_A = IntLinear(0)
MODEL_B = IntLinear(1)
#: Holds one of the two models (they have the same size), not both.
ONE_MODEL = model_nbytes(MODEL_A)


def encode_ids(records: list[dict[str, Any]]) -> Any:
    return torch.tensor([[r["id"] + k for k in range(4)] for r in records], dtype=torch.float32)


def encode_a(records: list[dict[str, Any]]) -> Any:
    return torch.tensor([[r["a"] % 7 + k for k in range(4)] for r in records], dtype=torch.float32)


def attach_a(records: list[dict[str, Any]], out: Any) -> list[dict[str, Any]]:
    return [{**r, "a": int(v)} for r, v in zip(records, out.tolist())]


def attach_b(records: list[dict[str, Any]], out: Any) -> list[dict[str, Any]]:
    return [{**r, "b": int(v)} for r, v in zip(records, out.tolist())]


def two_model_stream(second: Any = MODEL_B, first: Any = MODEL_A, **options: Any) -> sp.Stream:
    return (
        sp.from_iterable([{"id": i} for i in range(RECORDS)])
        .map_gpu(encode_ids, first, attach_a, batch_size=3)
        .map_gpu(encode_a, second, attach_b, batch_size=3)
        .set_processing(task_size=TASK_SIZE, **options)
    )


def gpu_workers(cpu: int, gpu: int) -> dict[str, Any]:
    return {"backend": "multiprocessing", "num_cpu_workers": cpu, "num_gpu_workers": gpu, "gpu_worker_devices": ["cpu"] * gpu}


CONFIGS = {
    "simple": {"backend": "simple", "gpu_worker_devices": ["cpu"]},
    "threads-2": {"backend": "threads", "num_cpu_workers": 2, "gpu_worker_devices": ["cpu"]},
    "1cpu-1gpu": gpu_workers(1, 1),
    "1cpu-2gpu": gpu_workers(1, 2),
    "2cpu-1gpu": gpu_workers(2, 1),
}


def run_with_stats(stream: sp.Stream) -> tuple[list[Any], RunStats]:
    def run() -> tuple[list[Any], RunStats]:
        with sp.collect_stats() as stats:
            out = stream.to_list()
        return out, stats.runs[-1]

    return run_guarded(run, RUN_TIMEOUT_S, f"a run of {stream!r:.60}")


def swaps_where_forward_ran(stats: RunStats) -> list[int]:
    """Swaps per process that ran forward: each GPU worker, else the main process."""
    gpus = stats.workers("gpu")
    return [gpu.swaps for gpu in gpus] if gpus else [stats.main.swaps]


def expected_records() -> list[dict[str, Any]]:
    out = []
    for i in range(RECORDS):
        a = int(MODEL_A(torch.tensor([[i + k for k in range(4)]], dtype=torch.float32)).item())
        b = int(MODEL_B(torch.tensor([[a % 7 + k for k in range(4)]], dtype=torch.float32)).item())
        out.append({"id": i, "a": a, "b": b})
    return out


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_one_model_budget_gives_the_unbudgeted_output(config):
    options = CONFIGS[config]
    expected = expected_records()
    unbudgeted, plain_stats = run_with_stats(two_model_stream(**options))
    assert unbudgeted == expected
    assert swaps_where_forward_ran(plain_stats) == [0] * len(swaps_where_forward_ran(plain_stats))

    budgeted = two_model_stream(gpu_memory_budget=ONE_MODEL)
    out, stats = run_with_stats(budgeted.set_processing(**options))
    assert out == expected
    swaps = swaps_where_forward_ran(stats)
    assert sum(swaps) >= 1  # two models, room for one: they must take turns
    if config in ("simple", "1cpu-1gpu"):
        # One process feeds the device, stage after stage per task: a loads at start, then
        # b, a, b, ... once per later phase.
        assert swaps == [TASKS * GPU_STAGES - 1]
    elif config in ("threads-2", "1cpu-2gpu"):
        # At most one swap per task and stage (threads: in the shared cache; GPU workers: each).
        assert all(s <= TASKS * GPU_STAGES for s in swaps)
    else:
        # Several CPU workers: at most one swap per model and round, a round at least one batch.
        batches = [gpu.batches for gpu in stats.workers("gpu")]
        assert all(s <= b for s, b in zip(swaps, batches))
    assert all(p.swap_seconds >= 0.0 for p in stats.processes.values())
    assert ("model swaps" in stats.report()) == (sum(swaps) > 0)
    assert_same_as_simple(budgeted, **options)


@pytest.mark.parametrize("config", ["simple", "1cpu-1gpu"])
def test_equal_models_share_one_copy_and_never_swap(config):
    # A copy of model a in stage 2: equal content, one device copy, so the budget holds both.
    out, stats = run_with_stats(two_model_stream(copy.deepcopy(MODEL_A), gpu_memory_budget=ONE_MODEL, **CONFIGS[config]))
    assert [r["id"] for r in out] == list(range(RECORDS))
    assert swaps_where_forward_ran(stats) == [0]
    assert out == run_with_stats(two_model_stream(copy.deepcopy(MODEL_A), **CONFIGS["simple"]))[0]


@pytest.mark.parametrize("config", ["simple", "threads-2", "1cpu-1gpu"])
def test_a_model_larger_than_the_budget_is_an_error_before_any_batch(config):
    seen: list[int] = []

    def encode_and_count(records: list[dict[str, Any]]) -> Any:
        seen.append(len(records))
        return encode_ids(records)

    stream = (
        sp.from_iterable([{"id": i} for i in range(RECORDS)])
        .map_gpu(encode_and_count, MODEL_A, attach_a, batch_size=3)
        .set_processing(task_size=TASK_SIZE, gpu_memory_budget=ONE_MODEL - 1, **CONFIGS[config])
    )
    message = rf"stage 1 \(map_gpu.*\): its model takes {ONE_MODEL} bytes .* gpu_memory_budget of {ONE_MODEL - 1} bytes"
    with pytest.raises(ValueError, match=message):
        run_guarded(stream.to_list, RUN_TIMEOUT_S, "a run over budget")
    if config != "1cpu-1gpu":  # prepare_batch runs in this process: no batch went through it
        assert seen == []


@pytest.mark.parametrize("config", ["simple", "1cpu-1gpu"])
def test_budget_with_on_error_skip_gives_the_same_output(config):
    # on_error runs each batch through its own runner call (to split failing batches): each
    # batch is then a phase of its own, and the swaps are bounded by the batches.
    stream = two_model_stream(gpu_memory_budget=ONE_MODEL, on_error="skip", **CONFIGS[config])
    out, stats = run_with_stats(stream)
    assert out == expected_records()
    batches = 2 * TASKS * 3  # two stages, tasks of 8 records in batches of 3, 3, 2
    assert 1 <= sum(swaps_where_forward_ran(stats)) <= batches


@pytest.mark.gpu
def test_one_model_budget_on_cuda_with_bfloat16_weights():
    # Real moves between host and device, pinned uploads on the side stream, weights cast on
    # the device. Multiprocessing first: CUDA is then not yet initialised here.
    budget = ONE_MODEL // 2  # one model, in bfloat16
    # Fresh models: the simple backend moves and casts the very objects it is given.
    stream = two_model_stream(
        IntLinear(1), IntLinear(0), gpu_memory_budget=budget, model_dtype="bfloat16", gpu_worker_devices=["cuda:0"]
    )
    actual, stats = run_with_stats(stream.set_processing(backend="multiprocessing", num_cpu_workers=1, num_gpu_workers=1))
    assert swaps_where_forward_ran(stats) == [TASKS * GPU_STAGES - 1]
    expected, simple_stats = run_with_stats(stream.set_processing(backend="simple"))
    assert actual == expected
    assert swaps_where_forward_ran(simple_stats) == [TASKS * GPU_STAGES - 1]


def test_budget_in_cpu_workers_without_gpu_workers():
    # num_gpu_workers=0: forward runs in each CPU worker, which has a cache of its own.
    options = {"backend": "multiprocessing", "num_cpu_workers": 2, "num_gpu_workers": 0}
    out, stats = run_with_stats(two_model_stream(gpu_memory_budget=ONE_MODEL, **options))
    assert out == expected_records()
    swaps = [cpu.swaps for cpu in stats.workers("cpu")]
    # Each CPU worker feeds its own device copy, task after task: at most one swap per task and stage.
    assert 1 <= sum(swaps) <= TASKS * GPU_STAGES


@pytest.mark.parametrize("config", [{"backend": "simple"}, gpu_workers(1, 1)], ids=["simple", "1cpu-1gpu"])
def test_a_budget_with_a_model_split_across_a_device_group_is_refused_naming_the_stage(config):
    # A model split across devices is placed once, not swapped: a budget cannot apply to it.
    options = {**config, "gpu_worker_devices": [("cpu", "cpu")], "gpu_memory_budget": ONE_MODEL}
    with pytest.raises(ValueError, match=r"stage 1 .*gpu_memory_budget does not apply to a model split across devices"):
        run_with_stats(two_model_stream(**options))
