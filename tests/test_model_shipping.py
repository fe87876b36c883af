"""Models shipped once (issue 10, item 3): large weights travel beside the plan, not in it.

A model's parameters and buffers of at least ``SHIPPED_TENSOR_MIN_BYTES`` are replaced by
references while the plan is pickled: inherited under fork, written once to a file that the
workers map under spawn and forkserver (and on warm pools). See NOTE [ streamproc weights
shipping ] in ``streamproc/execution/shared_weights.py``. Every run here is compared with the
simple backend, under every start method, inside the hang guard; the autouse fixture of
``tests/conftest.py`` fails a test that leaves a process or thread behind. Weight files go
under a per-test directory (``STREAMPROC_WEIGHTS_DIR``), checked empty after each run.

The models have identity-like integer weights, so outputs are exact and compare with ``==``.
"""

from __future__ import annotations

import copy
import functools
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import streamproc as sp
from streamproc.errors import SerializationError, WorkerCrashedError
from streamproc.execution import shared_weights
from streamproc.execution.serialization import dill_loads, dumps_plan
from streamproc.plan import build_plan
from tests.hang_guard import run_guarded
from tests.utils import UserError, assert_same_as_simple

torch = pytest.importorskip("torch")

# Workers run torch single-threaded here (torch_threads=1), which is what the fork warning asks.
pytestmark = pytest.mark.filterwarnings("ignore:process_start_method='fork'")

START_METHODS = ["fork", "spawn", "forkserver"]
#: (CPU workers, GPU workers on device "cpu"): forward in the CPU workers, or in a GPU worker.
TOPOLOGIES = {"2cpu": (2, 0), "1cpu-1gpu": (1, 1)}
RUN_TIMEOUT_S = 120.0
WIDTH = 256  # a 256 x 256 float32 weight is 256 KiB, above the shipping threshold


class Scaler(torch.nn.Module):
    """``layers`` linear layers with weights ``k * I`` (k = 1, 2, ...) and a large buffer:
    ``forward(x) = (x * layers!) + offset[0]``, exactly, for small integer inputs."""

    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers))
        with torch.no_grad():
            for k, layer in enumerate(self.layers, start=1):
                layer.weight.copy_(torch.eye(WIDTH) * k)
                layer.bias.zero_()
        self.register_buffer("offset", torch.full((WIDTH, WIDTH), 3.0))

    def forward(self, x: Any) -> Any:
        for layer in self.layers:
            x = layer(x)
        return x + self.offset[0]


def model_nbytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def score_with(model: Any, x: int) -> float:
    """map fn: runs the model on one record (CPU worker)."""
    with torch.no_grad():
        return float(model(torch.full((1, WIDTH), float(x))).sum())


def prepare(records: list[int]) -> Any:
    return torch.tensor(records, dtype=torch.float32)[:, None].repeat(1, WIDTH)


def forward_with(model: Any, batch: Any) -> Any:
    with torch.no_grad():
        return model(batch).sum(dim=1)


def model_stream(model: Any, gpu: int, n: int = 12) -> sp.Stream:
    """``model`` travels by value (a partial), as a closure over a user's model does."""
    if gpu:
        return sp.from_iterable(range(n)).map_gpu(prepare, functools.partial(forward_with, model), batch_size=4)
    return sp.from_iterable(range(n)).map(functools.partial(score_with, model))


def options(method: str, cpu: int, gpu: int, **more: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "backend": "multiprocessing", "num_cpu_workers": cpu, "process_start_method": method, "torch_threads": 1,
    }
    if gpu:
        config.update(num_gpu_workers=gpu, gpu_worker_devices=["cpu"] * gpu)
    return {**config, **more}


@pytest.fixture
def weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "weights"
    root.mkdir()
    monkeypatch.setenv(shared_weights.WEIGHTS_DIR_ENV, str(root))
    return root


@pytest.fixture
def shipped(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Records, in the main process, the plan bytes sent to workers and the weight files written."""
    from streamproc.backends.multiprocessing import run as run_module

    seen: dict[str, list[Any]] = {"plans": [], "files": []}
    dumps_worker_plan, dumps_forwards = run_module.dumps_worker_plan, run_module.dumps_plan
    write_file = shared_weights._write_file

    def record_plan(*args: Any, **kwargs: Any) -> bytes:
        data = dumps_worker_plan(*args, **kwargs)
        seen["plans"].append(len(data))
        return data

    def record_forwards(*args: Any, **kwargs: Any) -> bytes:
        data = dumps_forwards(*args, **kwargs)
        seen["plans"].append(len(data))
        return data

    def record_file(path: str, tensors: dict[str, Any]) -> None:
        seen["files"].append((path, sum(t.untyped_storage().nbytes() for t in tensors.values())))
        write_file(path, tensors)

    monkeypatch.setattr(run_module, "dumps_worker_plan", record_plan)
    monkeypatch.setattr(run_module, "dumps_plan", record_forwards)
    monkeypatch.setattr(shared_weights, "_write_file", record_file)
    return seen


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- end to end ----------------------------------------------------------------------------


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
@pytest.mark.parametrize("method", START_METHODS)
def test_same_as_simple_and_the_plan_does_not_carry_the_weights(method, topology, weights_dir, shipped):
    cpu, gpu = TOPOLOGIES[topology]
    model = Scaler()
    size = model_nbytes(model)  # 1.3 MB
    stream = model_stream(model, gpu)
    got = run_guarded(lambda: assert_same_as_simple(stream, **options(method, cpu, gpu)), RUN_TIMEOUT_S)
    assert got[:3] == [768.0, 24 * WIDTH + 768.0, 48 * WIDTH + 768.0]
    assert shipped["plans"] and all(length < size / 20 for length in shipped["plans"]), (shipped["plans"], size)
    if method == "fork":  # inherited: nothing written
        assert shipped["files"] == []
    else:  # one file, holding the large tensors once (the biases, 1 KiB each, stay in the plan)
        assert len(shipped["files"]) == 1
        assert size - 4 * WIDTH * 4 <= shipped["files"][0][1] <= size
    assert leftovers(weights_dir) == []
    assert shared_weights._INHERITED == {}


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_model_reached_by_two_stages_and_two_workers_is_written_once(method, weights_dir, shipped):
    model = Scaler()
    twin = copy.deepcopy(model)  # equal content, another object: the same content keys
    stream = (
        sp.from_iterable(range(12))
        .map_gpu(prepare, functools.partial(forward_with, model), batch_size=4)
        .map(lambda y, m=twin: float(y) + score_with(m, 0))
        .map_gpu(
            lambda ys: torch.tensor([y % 7 for y in ys])[:, None].repeat(1, WIDTH),
            functools.partial(forward_with, model), batch_size=4,
        )
    )
    run_guarded(lambda: assert_same_as_simple(stream, **options(method, 2, 2)), RUN_TIMEOUT_S)
    large = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()] if t.numel() > WIDTH)
    assert [nbytes for _, nbytes in shipped["files"]] == [large]
    assert leftovers(weights_dir) == []


def changes_its_weight(model: Any, x: int) -> float:
    """map fn: reads a weight, then changes it in place (as a careless forward might)."""
    with torch.no_grad():
        seen = float(model.layers[0].weight[0, 0])
        model.layers[0].weight.add_(1.0)
    return seen


@pytest.mark.parametrize("method", START_METHODS)
def test_a_workers_in_place_change_does_not_reach_the_main_process(method, weights_dir):
    model = Scaler()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    stream = sp.from_iterable(range(5)).map(functools.partial(changes_its_weight, model))
    got = run_guarded(lambda: stream.set_processing(**options(method, 1, 0)).to_list(), RUN_TIMEOUT_S)
    assert got == [1.0, 2.0, 3.0, 4.0, 5.0]  # the worker sees its own changes, as with pickled weights
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert leftovers(weights_dir) == []


def is_tied(model: Any, x: int) -> bool:
    return model.layers[0].weight is model.layers[1].weight and model.layers[1].weight.requires_grad


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_tied_weights_stay_one_parameter_in_the_worker(method, weights_dir, shipped):
    model = Scaler()
    model.layers[1].weight = model.layers[0].weight
    stream = sp.from_iterable(range(2)).map(functools.partial(is_tied, model))
    assert run_guarded(lambda: stream.set_processing(**options(method, 1, 0)).to_list(), RUN_TIMEOUT_S) == [True, True]
    assert all(length < model_nbytes(model) / 20 for length in shipped["plans"])


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_warm_pool_ships_a_model_once_and_each_run_starts_from_its_weights(method, weights_dir, shipped):
    model = Scaler()

    def runs() -> tuple[list[Any], list[Any], list[Any]]:
        with sp.WorkerPool(num_cpu_workers=1, num_gpu_workers=1, gpu_worker_devices=["cpu"], process_start_method=method) as pool:
            gpu_stream = model_stream(model, gpu=1).set_processing(pool=pool, torch_threads=1)
            changing = sp.from_iterable(range(3)).map(functools.partial(changes_its_weight, model))
            results = (gpu_stream.to_list(), gpu_stream.to_list(), changing.set_processing(pool=pool).to_list())
            again = changing.set_processing(pool=pool).to_list()
            assert len(shipped["files"]) == 1  # the second and later runs wrote nothing
            assert leftovers(weights_dir) != []  # kept for the pool's later runs
        return (*results[:2], [results[2], again])

    first, second, changed = run_guarded(runs, RUN_TIMEOUT_S)
    assert first == second == model_stream(model, gpu=1).set_processing(backend="simple").to_list()
    assert changed == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]  # the next run reads the weights again
    assert leftovers(weights_dir) == []  # closing the pool removed them


# -- every exit path cleans up ---------------------------------------------------------------


def fails_at(model: Any, at: int, x: int) -> float:
    if x == at:
        raise UserError(f"bad record {x}")
    return score_with(model, x)


def killed_at(model: Any, at: int, x: int) -> float:
    if x == at:
        os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer's stand-in
    return score_with(model, x)


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("fault", ["error", "killed worker", "consumer stops early", "ctrl-c"])
def test_no_weight_file_is_left_on_any_exit_path(method, fault, weights_dir, shipped):
    model = Scaler()
    config = options(method, 2, 0)
    if fault == "error":
        stream = sp.from_iterable(range(12)).map(functools.partial(fails_at, model, 5))
        with pytest.raises(UserError, match="bad record 5"):
            run_guarded(lambda: stream.set_processing(**config).to_list(), RUN_TIMEOUT_S)
    elif fault == "killed worker":
        stream = sp.from_iterable(range(12)).map(functools.partial(killed_at, model, 5))
        with pytest.raises(WorkerCrashedError, match="SIGKILL"):
            run_guarded(lambda: stream.set_processing(**config).to_list(), RUN_TIMEOUT_S)
    elif fault == "ctrl-c":  # KeyboardInterrupt reaches the main process while the run is open
        def interrupted() -> None:
            for _ in model_stream(model, 0, n=100).set_processing(**config):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_guarded(interrupted, RUN_TIMEOUT_S)
    else:
        def first_two() -> list[Any]:
            iterator = iter(model_stream(model, 0, n=100).set_processing(**config))
            taken = [next(iterator), next(iterator)]
            iterator.close()  # type: ignore[attr-defined]
            return taken

        assert run_guarded(first_two, RUN_TIMEOUT_S) == [768.0, 24 * WIDTH + 768.0]
    assert len(shipped["files"]) == (0 if method == "fork" else 1)
    assert leftovers(weights_dir) == []
    assert shared_weights._INHERITED == {}


def test_a_directory_left_by_a_killed_main_process_is_removed(weights_dir):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = weights_dir / f"{shared_weights.WEIGHTS_DIR_PREFIX}{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "weights-1.pt").write_bytes(b"x" * 100)
    mine = weights_dir / f"{shared_weights.WEIGHTS_DIR_PREFIX}{os.getpid()}-other"  # a live process's: kept
    mine.mkdir()
    stream = model_stream(Scaler(), 0, n=2)
    run_guarded(lambda: assert_same_as_simple(stream, **options("spawn", 1, 0)), RUN_TIMEOUT_S)
    assert leftovers(weights_dir) == [mine.name]


def test_an_unpicklable_leftover_still_names_the_op_and_writes_nothing(weights_dir, shipped):
    model = Scaler()
    pending = (i for i in range(3))  # a generator: dill cannot pickle it

    def uses_both(x: int) -> float:
        return score_with(model, x) + next(pending, 0)

    stream = sp.from_iterable(range(4)).map(uses_both).set_processing(**options("spawn", 1, 0))
    named = r"cannot serialize the map fn '\S*uses_both' of stage 1 .*cannot pickle 'generator'"
    with pytest.raises(SerializationError, match=named):
        run_guarded(stream.to_list, RUN_TIMEOUT_S)
    assert shipped["files"] == []
    assert leftovers(weights_dir) == []


# -- the pickling hook, without processes --------------------------------------------------


def test_the_hook_replaces_large_tensors_and_the_loader_resolves_them(weights_dir):
    model = Scaler()
    model.layers[0].weight.requires_grad_(False)
    plan = build_plan(model_stream(model, 0))
    shipper = shared_weights.WeightShipper()
    try:
        data = dumps_plan((model, {"small": torch.ones(3)}), plan, shipper, inherit=False)
        assert len(data) < model_nbytes(model) / 20 and shipper.files_written == 1
        shared_weights.forget_loaded_weights()
        loaded, extra = dill_loads(data)
        assert type(loaded.layers[1].weight) is torch.nn.Parameter and loaded.layers[1].weight.requires_grad
        assert not loaded.layers[0].weight.requires_grad
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
        assert torch.equal(extra["small"], torch.ones(3))
        again = dumps_plan(model, plan, shipper, inherit=False)  # already written: refs only
        assert shipper.files_written == 1 and len(again) < model_nbytes(model) / 20
        assert dill_loads(again).offset.data_ptr() == loaded.offset.data_ptr()  # reused, not reloaded
    finally:
        shipper.close()
        shared_weights.forget_loaded_weights()
    assert leftovers(weights_dir) == []


def test_an_inherited_reference_outside_a_forked_worker_says_so(weights_dir):
    model = Scaler()
    plan = build_plan(model_stream(model, 0))
    shipper = shared_weights.WeightShipper()
    data = dumps_plan(model, plan, shipper, inherit=True)
    shipper.close()  # as a run's end does; a process forked now would not find the weights
    with pytest.raises(SerializationError, match="was not forked after the plan was pickled"):
        dill_loads(data)


def test_the_pickling_hook_is_thread_safe_enough_for_two_runs_at_once(weights_dir):
    shipper = shared_weights.WeightShipper()
    models = [Scaler(), Scaler()]
    plan = build_plan(model_stream(models[0], 0))
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda m=m: results.append(dumps_plan(m, plan, shipper))) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(RUN_TIMEOUT_S)
    try:
        assert len(results) == 2 and shipper.files_written >= 1
        shared_weights.forget_loaded_weights()
        assert all(torch.equal(dill_loads(data).offset, models[0].offset) for data in results)
    finally:
        shipper.close()
        shared_weights.forget_loaded_weights()
