"""``model_dtype``: weights cast once on the device, kept fp32 modules, inputs, tolerance, bytes.

On CPU devices: bfloat16 everywhere, float16 where this torch's CPU kernels have it. The
tolerance checks use random weights (simple backend: one process); the backend comparisons
use small integer weights and inputs, exact in bfloat16 (integers below 256), so outputs
compare with ``==``. Runs that start processes or threads are under the hang guard.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

import streamproc as sp
from streamproc.gpu import ModelCache, ModelSettings, model_nbytes
from tests.hang_guard import run_guarded
from tests.utils import assert_same_as_simple

torch = pytest.importorskip("torch")

RUN_TIMEOUT_S = 120
#: bfloat16 keeps 8 significant bits (each rounding within 2^-8 = 0.4%): a few layers of
#: width 16 with outputs of magnitude ~1 stay within this of float32. See docs/_parts/models-budget.md.
BF16_TOLERANCE = 5e-2
#: float16 keeps 11 significant bits.
FP16_TOLERANCE = 1e-2


class NormedMLP(torch.nn.Module):
    """Linear, LayerNorm (kept fp32, as Hugging Face models ask), Linear."""

    _keep_in_fp32_modules: ClassVar[list[str]] = ["norm"]

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inner = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: Any) -> Any:
        h = self.norm(self.inner(x).float())  # the norm runs in fp32, as the model asks
        return self.head(h.to(self.head.weight.dtype))


def float_inputs(records: list[int]) -> Any:
    """float32 features: cast to the model dtype at upload."""
    return torch.stack([torch.sin(torch.arange(8, dtype=torch.float32) * (r + 1)) for r in records])


def as_lists(records: list[int], out: Any) -> list[list[float]]:
    return [[float(v) for v in row] for row in out.float().tolist()]


def mlp_stream(model: Any, **options: Any) -> sp.Stream:
    return (
        sp.from_iterable(range(24))
        .map_gpu(float_inputs, model, as_lists, batch_size=5)
        .set_processing(task_size=8, gpu_worker_devices=["cpu"], **options)
    )


# -- the cache: bytes, dtypes, kept modules ----------------------------------------------------


def test_bfloat16_halves_the_cached_bytes_and_keeps_the_norm_fp32():
    model = NormedMLP()
    fp32_bytes = model_nbytes(model)
    norm_bytes = 2 * 16 * 4
    cache = ModelCache("cpu", ModelSettings(dtype=torch.bfloat16))
    models = cache.register([model], "stage 1")
    assert models[0].dtype == "bfloat16"
    assert cache.nbytes(models) == (fp32_bytes - norm_bytes) // 2 + norm_bytes
    cache.load(models)
    assert cache.loaded_bytes == cache.nbytes(models)
    assert model.inner.weight.dtype == torch.bfloat16 and model.head.bias.dtype == torch.bfloat16
    assert model.norm.weight.dtype == torch.float32 and model.norm.bias.dtype == torch.float32


def test_a_model_without_kept_modules_takes_exactly_half():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    cache = ModelCache("cpu", ModelSettings(dtype="bfloat16"))
    models = cache.register([model], "stage 1")
    assert cache.nbytes(models) * 2 == model_nbytes(model)


def test_weights_are_cast_once_and_stay_cast_across_swaps():
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8, bias=False)
    cache = ModelCache("cpu", ModelSettings(memory_budget=model_nbytes(a) // 2, dtype=torch.bfloat16))
    ka, kb = cache.register([a], "stage 1"), cache.register([b], "stage 2")
    for models in [ka, kb, ka]:
        cache.load(models)
    assert cache.swaps == 2
    assert a.weight.dtype == b.weight.dtype == torch.bfloat16


def test_integer_buffers_keep_their_dtype():
    norm = torch.nn.BatchNorm1d(4)
    cache = ModelCache("cpu", ModelSettings(dtype=torch.float16))
    cache.load(cache.register([norm], "stage 1"))
    assert norm.running_mean.dtype == torch.float16
    assert norm.num_batches_tracked.dtype == torch.int64


# -- end to end: inputs, tolerance, backends ---------------------------------------------------


@pytest.mark.parametrize(("dtype", "tolerance"), [("bfloat16", BF16_TOLERANCE), (torch.float16, FP16_TOLERANCE)])
def test_outputs_within_tolerance_of_float32(dtype, tolerance):
    reference = np.array(mlp_stream(NormedMLP(), backend="simple").to_list())
    try:
        cast = np.array(mlp_stream(NormedMLP(), backend="simple", model_dtype=dtype).to_list())
    except RuntimeError as exc:  # depends on this torch build's CPU kernels
        pytest.skip(f"{dtype} is not usable on this CPU: {exc}")
    assert cast.shape == reference.shape
    np.testing.assert_allclose(cast, reference, rtol=tolerance, atol=tolerance)
    assert not np.array_equal(cast, reference)  # the weights were really cast


class IdEmbedding(torch.nn.Module):
    """Integer ids in (an Embedding needs them as integers), small integer weights out."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(64, 2)
        self.scale = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.arange(128, dtype=torch.float32).reshape(64, 2) % 9)
            self.scale.weight.copy_(torch.tensor([[2.0, -1.0]]))

    def forward(self, batch: dict[str, Any]) -> Any:
        assert batch["ids"].dtype == torch.int64  # not cast: integer ids stay integers
        assert batch["offset"].dtype == self.scale.weight.dtype  # floats cast at upload
        return self.scale(self.embedding(batch["ids"])).squeeze(1) + batch["offset"]


def encode_ids(records: list[int]) -> dict[str, Any]:
    return {"ids": torch.tensor(records, dtype=torch.int64), "offset": torch.tensor([float(r % 3) for r in records])}


def attach(records: list[int], out: Any) -> list[dict[str, Any]]:
    return [{"id": r, "out": float(v)} for r, v in zip(records, out.tolist())]


def id_stream(**options: Any) -> sp.Stream:
    return sp.from_iterable(range(40)).map_gpu(encode_ids, IdEmbedding(), attach, batch_size=6).set_processing(
        task_size=10, model_dtype="bfloat16", **options
    )


def expected_id_outputs() -> list[dict[str, Any]]:
    weights = np.arange(128).reshape(64, 2) % 9
    return [{"id": r, "out": float(2 * weights[r, 0] - weights[r, 1] + r % 3)} for r in range(40)]


@pytest.mark.parametrize(
    "options",
    [
        {"backend": "simple", "gpu_worker_devices": ["cpu"]},
        {"backend": "threads", "num_cpu_workers": 2, "gpu_worker_devices": ["cpu"]},
        {"backend": "multiprocessing", "num_cpu_workers": 1, "num_gpu_workers": 1, "gpu_worker_devices": ["cpu"]},
        {"backend": "multiprocessing", "num_cpu_workers": 2, "num_gpu_workers": 2, "gpu_worker_devices": ["cpu", "cpu"]},
    ],
    ids=["simple", "threads-2", "1cpu-1gpu", "2cpu-2gpu"],
)
def test_integer_ids_stay_integers_and_backends_agree(options):
    out = run_guarded(lambda: assert_same_as_simple(id_stream(), **options), RUN_TIMEOUT_S, "a bfloat16 run")
    assert out == expected_id_outputs()


def test_dtype_and_budget_together_fit_two_halved_models():
    # A budget for the two models in bfloat16 (less than one and a half in float32): no swap.
    first, second = NormedMLP(0), NormedMLP(1)
    norm_bytes = 2 * 16 * 4
    budget = 2 * ((model_nbytes(first) - norm_bytes) // 2 + norm_bytes)
    assert budget < 1.5 * model_nbytes(first)
    stream = (
        sp.from_iterable(range(24))
        .map_gpu(float_inputs, first, as_lists, batch_size=5)
        .map(lambda row: row[0] * 0 + 1)
        .map_gpu(float_inputs, second, as_lists, batch_size=5)
        .set_processing(task_size=8, gpu_worker_devices=["cpu"], model_dtype="bfloat16", gpu_memory_budget=budget)
    )
    with sp.collect_stats() as stats:
        out = stream.to_list()
    assert len(out) == 24 and stats.runs[-1].main.swaps == 0


def test_a_model_split_across_a_device_group_is_cast_too():
    # Model parallel bypasses the cache (nothing to swap), not the cast.
    reference = np.array(mlp_stream(NormedMLP(), backend="simple").to_list())
    stream = mlp_stream(NormedMLP(), backend="simple", model_dtype="bfloat16")
    cast = np.array(stream.set_processing(gpu_worker_devices=[("cpu", "cpu")]).to_list())
    np.testing.assert_allclose(cast, reference, rtol=BF16_TOLERANCE, atol=BF16_TOLERANCE)
    assert not np.array_equal(cast, reference)  # the weights were really cast
