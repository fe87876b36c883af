"""Model parallel: one worker owning a device group, the model split over it (gpu/placement.py).

A group of ``("cpu", "cpu")`` runs the split model on one real device, so its output must be
the single-device output bit for bit, on every backend; the split itself (which block goes
to which device of the group) is checked on the recorded :class:`Placement`. Moving
activations between devices is checked on a real pair of devices available without a GPU:
``("cpu", "meta")`` (meta tensors have shapes but no data, and torch refuses to mix them with
CPU tensors, so a missing move fails). Models have small integer weights and inputs, so float
results are exact whatever the kernel, thread count or process, and compare with ``==``.

Multiprocessing runs use the default start method and run under the hang guard; the autouse
fixture of ``tests/conftest.py`` fails a test that leaves a process or thread behind.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

import streamproc as sp
from streamproc.gpu.forward import DeviceForward
from streamproc.gpu.partition import Placement, balance, find_blocks, plan_placement
from streamproc.gpu.placement import place_modules
from tests.hang_guard import run_guarded
from tests.utils import UserError, assert_records_equal, assert_same_as_simple, stage_notes

torch = pytest.importorskip("torch")

#: A multiprocessing run of 40 records on a loaded 2-core machine ends well within this.
RUN_TIMEOUT_S = 120.0
PLACEMENT_LOGGER = "streamproc.gpu.placement"
TOKENS = 5


# -- models with small integer weights (exact float results) ----------------------------------


def _integer_weights(module: Any, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randint(-1, 2, param.shape, generator=generator).float())
    return module


class ListModel(torch.nn.Module):
    """embed + 4 layers (a ModuleList, looped over in forward) + head: the blocks are
    ``embed, layers.0, ..., layers.3, head``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)  # 80 floats: 320 bytes
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))  # 72 floats each: 288 bytes
        self.head = torch.nn.Linear(8, 3)  # 27 floats: 108 bytes
        _integer_weights(self, seed=1)

    def forward(self, ids: Any) -> Any:
        x = self.embed(ids)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x).sum(dim=1)


def sequential_model() -> torch.nn.Sequential:
    """Blocks: its 6 children; the ReLUs hold nothing, so they follow the Linear before them."""
    model = torch.nn.Sequential(
        torch.nn.Linear(TOKENS, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
        torch.nn.Linear(8, 8), torch.nn.Linear(8, 2),
    )
    return _integer_weights(model, seed=2)


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.scale = torch.nn.Parameter(torch.ones(8))  # held by a module on the path, not a block

    def forward(self, x: Any) -> Any:
        for layer in self.layer:
            x = layer(x)
        return x


class NestedModel(torch.nn.Module):
    """A BERT-like nesting: the layer stack is ``encoder.layer``, two levels down."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = torch.nn.Embedding(10, 8)
        self.encoder = Encoder()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))  # a smaller stack: not the one
        self.register_buffer("offset", torch.zeros(2))

    def forward(self, ids: Any) -> Any:
        return self.mlp(self.encoder(self.embeddings(ids))).sum(dim=1) + self.offset


class MaskedLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: Any, mask: Any = None) -> Any:
        return self.linear(x) * mask


class MaskedModel(torch.nn.Module):
    """Layers called with a keyword tensor (an attention-mask stand-in) made on the input's device."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.layers = torch.nn.ModuleList(MaskedLayer() for _ in range(4))

    def forward(self, ids: Any) -> Any:
        mask = (ids > 0).float().unsqueeze(-1)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, mask=mask)
        return x


class FlatModel(torch.nn.Module):
    """No Sequential/ModuleList: nothing to split."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Embedding(10, 4)
        self.second = torch.nn.Linear(4, 2)
        _integer_weights(self, seed=3)

    def forward(self, ids: Any) -> Any:
        return self.second(self.first(ids)).sum(dim=1)


class TiedModel(torch.nn.Module):
    """Embedding and head share one weight (tied embeddings, as in GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: Any) -> Any:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


# -- stream callables (module level: they pickle by reference) --------------------------------


def make_records(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "tokens": [(i * 7 + j * 3) % 10 for j in range(TOKENS)]} for i in range(n)]


def token_ids(records: list[dict[str, Any]]) -> Any:
    return torch.tensor([r["tokens"] for r in records], dtype=torch.int64)


def token_floats(records: list[dict[str, Any]]) -> Any:
    return torch.tensor([r["tokens"] for r in records], dtype=torch.float32)


def attach(records: list[dict[str, Any]], outputs: Any) -> list[dict[str, Any]]:
    return [{"id": r["id"], "out": row.tolist()} for r, row in zip(records, outputs)]


MODELS = {
    "sequential": (sequential_model, token_floats),
    "modulelist": (ListModel, token_ids),
}


def model_stream(kind: str, n: int = 40, **map_gpu_kwargs: Any) -> sp.Stream:
    make_model, prepare = MODELS[kind]
    return (
        sp.from_iterable(make_records(n))
        .map_gpu(prepare, make_model(), attach, batch_size=4, **map_gpu_kwargs)
        .set_processing(task_size=8)
    )


def single_device_output(stream: sp.Stream) -> list[Any]:
    return stream.set_processing(backend="simple", gpu_worker_devices=["cpu"]).to_list()


def record_place_call(path: Path, module: Any, devices: list[Any]) -> None:
    """A ``place`` hook for worker processes: appends the call to ``path``; moves nothing."""
    with path.open("a") as f:
        f.write(f"{type(module).__name__} {[str(d) for d in devices]}\n")


def failing_place(module: Any, devices: list[Any]) -> None:
    raise UserError("cannot place the model")


# -- the balance rule (pure) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "num_devices", "expected"),
    [
        ([1, 1, 1, 1], 2, [0, 0, 1, 1]),
        ([4, 0, 4, 0], 2, [0, 0, 1, 1]),  # parameter-free blocks stay with the block before them
        ([10, 1, 1, 1], 3, [0, 1, 1, 2]),
        ([2, 2, 2, 2], 3, [0, 0, 1, 2]),  # every device gets a block (not [0, 0, 1, 1]); ties: latest cuts
        ([5, 5], 3, [0, 1]),  # fewer blocks than devices: one block each
        ([7], 2, [0]),
        ([], 2, []),
        ([320, 288, 288, 288, 288, 108], 2, [0, 0, 0, 1, 1, 1]),  # ListModel: 896 / 684 bytes
    ],
)
def test_balance(sizes, num_devices, expected):
    assert balance(sizes, num_devices) == expected


def _splits(n: int, k: int) -> list[list[int]]:
    """Every split of n blocks into k non-empty consecutive runs, as device indices."""
    if k == 1:
        return [[0] * n]
    return [[0] * first + [d + 1 for d in rest] for first in range(1, n - k + 2) for rest in _splits(n - first, k - 1)]


@pytest.mark.parametrize("num_devices", [2, 3, 4])
@pytest.mark.parametrize("seed", range(5))
def test_balance_minimises_the_largest_device_load(num_devices, seed):
    sizes = list(np.random.default_rng(seed).integers(0, 100, size=7))
    placed = balance(sizes, num_devices)
    assert placed == sorted(placed) and set(placed) == set(range(num_devices))  # consecutive, none empty

    def largest(split: list[int]) -> int:
        return max(sum(s for s, d in zip(sizes, split) if d == device) for device in range(num_devices))

    assert largest(placed) == min(largest(split) for split in _splits(len(sizes), num_devices))


def test_balance_refuses_no_devices():
    with pytest.raises(ValueError, match="num_devices must be at least 1"):
        balance([1], 0)


# -- blocks ---------------------------------------------------------------------------------------


def test_blocks_of_a_sequential_are_its_children():
    blocks, path = find_blocks(sequential_model())
    assert [name for name, _ in blocks] == ["0", "1", "2", "3", "4", "5"]
    assert [name for name, _ in path] == [""]


def test_blocks_of_a_modulelist_model_expand_its_layer_stack():
    blocks, _ = find_blocks(ListModel())
    assert [name for name, _ in blocks] == ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"]


def test_blocks_expand_the_path_to_the_largest_stack_and_keep_the_siblings():
    model = NestedModel()
    blocks, path = find_blocks(model)
    assert [name for name, _ in blocks] == ["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "mlp"]
    assert [name for name, _ in path] == ["", "encoder"]
    planned = plan_placement(model, ("cpu", "cpu"))
    assert planned is not None
    assert planned.first_device_tensors == ("offset", "encoder.scale")


def test_a_model_without_a_layer_stack_has_no_blocks():
    assert find_blocks(FlatModel()) is None
    assert plan_placement(FlatModel(), ("cpu", "cpu")) is None


# -- placement recorded on the runner -----------------------------------------------------------


def test_placement_is_recorded_per_block_and_balanced_by_bytes():
    model = ListModel()
    runner = DeviceForward(model, ("cpu", "cpu"), stage="stage 1 (map_gpu)")
    runner.start()
    [placement] = runner.placements
    assert placement == Placement(
        "ListModel", ("cpu", "cpu"),
        (("embed", 0), ("layers.0", 0), ("layers.1", 0), ("layers.2", 1), ("layers.3", 1), ("head", 1)),
        (320, 288, 288, 288, 288, 108),
    )
    assert placement.bytes_per_device() == [896, 684]  # the other cut (608 / 972) has a larger maximum
    assert placement.as_dict()["layers.2"] == "cpu"
    assert placement.describe() == "embed, layers.0, layers.1 -> cpu [0]; layers.2, layers.3, head -> cpu [1]"
    assert not model.training


def test_a_single_device_runner_records_no_placement():
    runner = DeviceForward(ListModel(), "cpu")
    runner.start()
    assert runner.placements == []


# -- activations move between two real devices: ("cpu", "meta") --------------------------------


@pytest.mark.parametrize("kind", ["sequential", "modulelist"])
def test_blocks_go_to_their_devices_and_inputs_follow(kind):
    make_model, prepare = MODELS[kind]
    model = make_model()
    [placement] = place_modules([model], ("cpu", "meta"), "stage 1")
    blocks, _ = find_blocks(model)
    for (name, block), (recorded, index) in zip(blocks, placement.modules):
        assert name == recorded
        assert all(t.device == torch.device(placement.devices[index]) for t in block.parameters())
    assert {index for _, index in placement.modules} == {0, 1}
    batch = prepare(make_records(3))
    with torch.inference_mode():
        outputs = model(batch)
    assert outputs.device.type == "meta"  # from the last block's device
    assert outputs.shape == single_device_model_outputs(kind, batch).shape
    for handle in model._streamproc_placement_hooks:  # without the hooks, torch refuses to mix devices
        handle.remove()
    with pytest.raises(RuntimeError), torch.inference_mode():
        model(batch)


def test_keyword_tensor_arguments_follow_the_block():
    model = MaskedModel()
    [placement] = place_modules([model], ("cpu", "meta"), "stage 1")
    assert [index for _, index in placement.modules] == [0, 0, 1, 1, 1]  # 320 + 288 | 3 x 288 bytes
    with torch.inference_mode():
        assert model(token_ids(make_records(2))).device.type == "meta"


def single_device_model_outputs(kind: str, batch: Any) -> Any:
    with torch.inference_mode():
        return MODELS[kind][0]()(batch)


def test_placing_twice_replaces_the_hooks():
    model = ListModel()
    place_modules([model], ("cpu", "cpu"), "stage 1")
    place_modules([model], ("cpu", "cpu"), "stage 1")
    assert len(model._streamproc_placement_hooks) == 6  # one per block, not two


def test_tied_weights_on_two_devices_are_refused():
    with pytest.raises(ValueError, match=r"stage 1: TiedModel shares a parameter or buffer between blocks 'embed' and 'head'"):
        place_modules([TiedModel()], ("cpu", "meta"), "stage 1")
    place_modules([TiedModel()], ("cpu", "cpu"), "stage 1")  # one device in fact: fine


def test_a_submodule_found_beside_its_model_is_placed_with_it():
    model = ListModel()
    placements = place_modules([model, model.head], ("cpu", "cpu"), "stage 1")
    assert [p.model for p in placements] == ["ListModel"]


# -- the place= hook ------------------------------------------------------------------------------


def test_place_hook_is_called_once_with_the_module_and_devices():
    model = ListModel()
    hook = mock.Mock(return_value=None)  # moves nothing: the model stays on the CPU
    stream = sp.from_iterable(make_records(40)).map_gpu(token_ids, model, attach, batch_size=4, place=hook)
    out = stream.set_processing(task_size=8, backend="simple", gpu_worker_devices=[("cpu", "cpu")]).to_list()
    hook.assert_called_once_with(model, [torch.device("cpu"), torch.device("cpu")])
    assert_records_equal(out, single_device_output(model_stream("modulelist")))


def test_place_hook_decides_the_devices_and_units_are_recorded():
    def put_the_second_half_on_meta(module: Any, devices: list[Any]) -> None:
        module.embed.to(devices[0])
        for index, layer in enumerate(module.layers):
            layer.to(devices[0] if index < 2 else devices[1])
        module.head.to(devices[1])

    model = ListModel()
    [placement] = place_modules([model], ("cpu", "meta"), "stage 1", place=put_the_second_half_on_meta)
    assert placement.by_hook
    assert placement.modules == (("embed", 0), ("layers.0", 0), ("layers.1", 0), ("layers.2", 1), ("layers.3", 1), ("head", 1))
    with torch.inference_mode():
        assert model(token_ids(make_records(2))).device.type == "meta"  # the units' hooks moved the activations


def test_place_hook_leaving_a_tensor_off_the_devices_is_refused():
    def to_meta(module: Any, devices: list[Any]) -> None:
        module.head.to("meta")

    with pytest.raises(ValueError, match=r"stage 1: place=.*to_meta left ListModel.head on meta, which is not one of"):
        place_modules([ListModel()], ("cpu", "cpu"), "stage 1", place=to_meta)


def test_place_hook_also_runs_for_a_single_device():
    hook = mock.Mock(return_value=None)
    model = ListModel()
    runner = DeviceForward(model, "cpu", place=hook)
    runner.start()
    hook.assert_called_once_with(model, [torch.device("cpu")])
    assert runner.placements[0].modules == (("", 0),)


def test_place_hook_error_names_the_stage():
    stream = model_stream("modulelist", place=failing_place).set_processing(backend="simple", gpu_worker_devices=[("cpu", "cpu")])
    with pytest.raises(UserError, match="cannot place the model") as info:
        stream.to_list()
    assert stage_notes(info.value) == [
        "streamproc: raised in stage 1 (map_gpu(token_ids, ListModel, attach, batch_size='4 records')), place"
    ]
    assert any("raised by place=failing_place placing ListModel over (cpu, cpu)" in n for n in info.value.__notes__)


def test_place_must_be_callable():
    with pytest.raises(TypeError, match="map_gpu\\(\\): place must be callable"):
        sp.from_iterable([1]).map_gpu(token_ids, ListModel(), place="auto")


# -- end to end: same bits as one device ---------------------------------------------------------


@pytest.mark.parametrize("group", [("cpu", "cpu"), ("cpu", "cpu", "cpu")], ids=["2", "3"])
@pytest.mark.parametrize("kind", ["sequential", "modulelist"])
def test_simple_backend_group_gives_the_single_device_output(kind, group, caplog):
    caplog.set_level(logging.INFO, logger=PLACEMENT_LOGGER)
    stream = model_stream(kind)
    out = stream.set_processing(backend="simple", gpu_worker_devices=[group]).to_list()
    assert_records_equal(out, single_device_output(stream))
    [record] = [r for r in caplog.records if r.name == PLACEMENT_LOGGER]
    assert f"placed over ({', '.join(group)}):" in record.getMessage()


@pytest.mark.parametrize("kind", ["sequential", "modulelist"])
def test_threads_backend_group_gives_the_single_device_output(kind):
    stream = model_stream(kind)
    out = assert_same_as_simple(stream, backend="threads", num_cpu_workers=2, gpu_worker_devices=[("cpu", "cpu")])
    assert_records_equal(out, single_device_output(stream))


@pytest.mark.parametrize("num_cpu_workers", [1, 2])
@pytest.mark.parametrize("kind", ["sequential", "modulelist"])
def test_one_gpu_worker_owning_a_group_gives_the_single_device_output(kind, num_cpu_workers, caplog):
    caplog.set_level(logging.INFO, logger=PLACEMENT_LOGGER)
    stream = model_stream(kind)
    options = {
        "backend": "multiprocessing", "num_cpu_workers": num_cpu_workers, "num_gpu_workers": 1,
        "gpu_worker_devices": [("cpu", "cpu")],
    }
    out = run_guarded(lambda: assert_same_as_simple(stream, **options), RUN_TIMEOUT_S, "a GPU worker owning a group")
    assert_records_equal(out, single_device_output(stream))
    placed = [r.getMessage() for r in caplog.records if r.name == PLACEMENT_LOGGER]
    assert len(placed) == 1 and placed[0].startswith("[gpu worker 0] streamproc: stage 1"), placed
    assert "placed over (cpu, cpu):" in placed[0]


def test_num_gpu_workers_cycles_a_group(tmp_path):
    calls = tmp_path / "place-calls.txt"
    stream = model_stream("modulelist", place=functools.partial(record_place_call, calls))
    options = {"backend": "multiprocessing", "num_cpu_workers": 2, "num_gpu_workers": 2, "gpu_worker_devices": [("cpu", "cpu")]}
    out = run_guarded(lambda: stream.set_processing(**options).to_list(), RUN_TIMEOUT_S, "two GPU workers owning a group")
    assert_records_equal(out, single_device_output(stream))
    # Once per GPU worker; then once for the simple run of single_device_output, on one device.
    assert calls.read_text().splitlines() == ["ListModel ['cpu', 'cpu']"] * 2 + ["ListModel ['cpu']"]


def test_place_hook_error_in_a_gpu_worker_names_the_stage_and_worker():
    stream = model_stream("modulelist", place=failing_place).set_processing(
        backend="multiprocessing", num_cpu_workers=1, num_gpu_workers=1, gpu_worker_devices=[("cpu", "cpu")]
    )
    with pytest.raises(UserError, match="cannot place the model") as info:
        run_guarded(stream.to_list, RUN_TIMEOUT_S, "a place hook that raises in a GPU worker")
    notes = info.value.__notes__
    assert "streamproc: raised in gpu worker 0 ((cpu, cpu)), at start-up" in notes, notes
    assert any("raised by place=failing_place placing ListModel over (cpu, cpu)" in n for n in notes), notes
    assert 'raise UserError("cannot place the model")' in str(info.value.__cause__)


def test_a_model_without_a_layer_stack_runs_whole_on_the_first_device(caplog):
    caplog.set_level(logging.INFO, logger=PLACEMENT_LOGGER)
    stream = sp.from_iterable(make_records(12)).map_gpu(token_ids, FlatModel(), attach, batch_size=4)
    out = stream.set_processing(backend="simple", gpu_worker_devices=[("cpu", "cpu")]).to_list()
    assert_records_equal(out, single_device_output(stream))
    [warning] = [r for r in caplog.records if r.name == PLACEMENT_LOGGER and r.levelno == logging.WARNING]
    assert "FlatModel has no Sequential/ModuleList layer stack to split over (cpu, cpu): it runs whole on cpu" in (
        warning.getMessage()
    )


def test_worker_info_device_of_a_group_is_its_first_device():
    seen = []

    def forward(batch: Any) -> Any:
        seen.append(sp.get_worker_info().device)
        return batch

    sp.from_iterable([1.0, 2.0]).map_gpu(torch.tensor, forward).set_processing(
        backend="simple", gpu_worker_devices=[("cpu", "cpu")]
    ).to_list()
    assert seen == ["cpu"]


# -- bad device specs -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["simple", "threads", "multiprocessing"])
def test_an_unknown_device_in_a_group_is_refused_before_any_worker_starts(backend, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stream = model_stream("modulelist").set_processing(backend=backend, gpu_worker_devices=[("cpu", "cuda:1")])
    with pytest.raises(ValueError, match=r"gpu_worker_devices: 'cuda:1' does not exist here: no CUDA device is visible"):
        stream.to_list()


def test_a_group_naming_a_gpu_twice_is_refused():
    from streamproc.gpu.availability import check_device_specs

    with pytest.raises(ValueError, match=r"the group \('cuda:0', 'cuda:0'\) names cuda:0 twice: .*only 'cpu' may repeat"):
        check_device_specs([("cuda:0", "cuda:0")], cuda_device_count=2)
    check_device_specs([("cpu", "cpu"), ("cuda:0", "cuda:1")], cuda_device_count=2)


# -- explain() --------------------------------------------------------------------------------------


def test_explain_shows_the_group_and_the_split():
    text = model_stream("modulelist").set_processing(backend="simple", gpu_worker_devices=[("cpu", "cpu")]).explain()
    assert "main process, on (cpu, cpu) (model parallel)" in text
    assert "split over (cpu, cpu): ListModel: embed, layers.0, layers.1 -> cpu [0]; layers.2, layers.3, head -> cpu [1]" in text


def test_explain_shows_each_gpu_workers_devices():
    stream = model_stream("modulelist", place=failing_place).set_processing(
        backend="multiprocessing", num_cpu_workers=2, gpu_worker_devices=[("cpu", "cpu"), "cpu"]
    )
    lines = [line.strip() for line in stream.explain().splitlines()]
    assert "gpu worker 0 on (cpu, cpu) (model parallel)" in lines
    assert "gpu worker 1 on cpu" in lines
    assert "split over (cpu, cpu): by place=failing_place, in the worker" in lines


def test_explain_of_a_forward_class_defers_the_split_to_the_worker():
    stream = sp.from_iterable(make_records(4)).map_gpu(token_ids, ListModel, attach).set_processing(
        backend="simple", gpu_worker_devices=[("cpu", "cpu")]
    )
    assert "split over (cpu, cpu): by block sizes, once the forward class is built in the worker" in stream.explain()


# -- CUDA (skipped without a device) ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sequential", "modulelist"])
def test_cuda_group_gives_the_cpu_output(kind):
    group = ("cuda:0", "cuda:1") if torch.cuda.device_count() >= 2 else ("cuda:0", "cpu")
    stream = model_stream(kind)
    expected = single_device_output(stream)
    out = stream.set_processing(backend="simple", gpu_worker_devices=[group]).to_list()
    assert_records_equal(out, expected)  # integer weights and inputs: exact on any device
    options = {"backend": "multiprocessing", "num_cpu_workers": 1, "num_gpu_workers": 1, "gpu_worker_devices": [group]}
    out = run_guarded(lambda: stream.set_processing(**options).to_list(), RUN_TIMEOUT_S, "a GPU worker owning a CUDA group")
    assert_records_equal(out, expected)


def test_a_place_hook_that_cannot_travel_to_gpu_workers_is_named():
    lock = threading.Lock()

    def locked_place(module: Any, devices: list[Any]) -> None:
        with lock:
            pass

    stream = model_stream("modulelist", place=locked_place).set_processing(
        backend="multiprocessing", num_cpu_workers=1, num_gpu_workers=1, gpu_worker_devices=[("cpu", "cpu")]
    )
    with pytest.raises(sp.SerializationError, match=r"the map_gpu place '.*locked_place' of stage 1 .* captures a lock"):
        run_guarded(stream.to_list, RUN_TIMEOUT_S, "a place hook holding a lock")
