"""The model cache (``gpu/model_cache.py``) and the GPU worker's swap schedule, without processes.

Content keys, followers sharing one copy, byte sizes, loads and swaps under a budget, the
too-large error, threads holding models while others wait; :class:`RoundSchedule`'s bounds
(swaps per round, no starvation) checked on fakes. Devices are the CPU: a load is then a move
in the cache's books, which is what the swap counts and the budget are about.
"""

from __future__ import annotations

import copy
import itertools
import threading
from typing import Any

import pytest

from streamproc.gpu.model_cache import ModelCache, ModelSettings
from streamproc.gpu.model_content import format_bytes, model_digest, model_nbytes, outermost_modules
from streamproc.gpu.swap_schedule import RoundSchedule
from tests.hang_guard import run_guarded

torch = pytest.importorskip("torch")

#: One guarded call on the CPU; generous for a loaded 2-core machine.
GUARD_TIMEOUT_S = 30.0


def linear(seed: int, size: int = 8) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Linear(size, size)


# -- content digest and sizes ------------------------------------------------------------------


def test_equal_content_gives_equal_digest_and_other_content_another():
    a = linear(0)
    assert model_digest(a) == model_digest(copy.deepcopy(a))
    assert model_digest(a) != model_digest(linear(1))
    changed = copy.deepcopy(a)
    with torch.no_grad():
        changed.bias[3] += 1.0
    assert model_digest(changed) != model_digest(a)
    # dtype and shape are part of the content, not only the bytes.
    assert model_digest(copy.deepcopy(a).to(torch.float64)) != model_digest(a)


def test_buffers_count_in_digest_and_size():
    norm = torch.nn.BatchNorm1d(4)  # weight, bias; buffers running_mean/var (fp32), num_batches_tracked (int64)
    assert model_nbytes(norm) == 4 * 4 * 4 + 8
    other = copy.deepcopy(norm)
    other.running_mean += 1.0
    assert model_digest(other) != model_digest(norm)


def test_size_counts_tied_weights_once_and_submodules_once():
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert model_nbytes(tied) == 10 * 4 * 4
    assert outermost_modules([tied, tied[0]]) == [tied]


def test_format_bytes():
    assert format_bytes(90_177_536) == "90,177,536 bytes (90.2 MB)"


# -- register, load, unload, swaps ---------------------------------------------------------------


def test_equal_models_of_two_stages_share_one_copy():
    a = linear(0)
    twin = copy.deepcopy(a)
    cache = ModelCache("cpu", ModelSettings(memory_budget=model_nbytes(a)))
    first = cache.register([a], "stage 1")
    second = cache.register([twin], "stage 2")
    assert first == second
    cache.load(first)
    assert cache.loaded_bytes == model_nbytes(a)
    # The twin's tensors are the cached module's: one copy of the weights.
    assert twin.weight.data_ptr() == a.weight.data_ptr()
    assert twin.bias.data_ptr() == a.bias.data_ptr()
    cache.load(second)
    assert cache.swaps == 0


def test_one_model_budget_swaps_on_every_change_of_model():
    a, b = linear(0), linear(1)
    cache = ModelCache("cpu", ModelSettings(memory_budget=model_nbytes(a)))
    models_a, models_b = cache.register([a], "stage 1"), cache.register([b], "stage 2")
    cache.preload(models_a)
    cache.preload(models_b)  # does not fit next to a: stays on the host
    assert cache.is_loaded(models_a) and not cache.is_loaded(models_b)
    for models in [models_a, models_b, models_b, models_a, models_b]:
        cache.load(models)
        assert cache.is_loaded(models)
        assert cache.loaded_bytes <= model_nbytes(a)
    assert cache.swaps == 3
    assert cache.swap_seconds > 0.0


def test_budget_for_two_of_three_evicts_the_least_recently_used():
    a, b, c = linear(0), linear(1), linear(2)
    cache = ModelCache("cpu", ModelSettings(memory_budget=2 * model_nbytes(a)))
    ka, kb, kc = (cache.register([m], f"stage {i}") for i, m in enumerate([a, b, c], 1))
    cache.load(ka)
    cache.load(kb)
    cache.load(ka)  # b is now the least recently used
    cache.load(kc)
    assert cache.is_loaded(ka) and cache.is_loaded(kc) and not cache.is_loaded(kb)
    assert cache.swaps == 1


def test_without_budget_everything_stays_and_nothing_swaps():
    a, b = linear(0), linear(1)
    cache = ModelCache("cpu")
    ka, kb = cache.register([a], "stage 1"), cache.register([b], "stage 2")
    cache.preload(ka)
    cache.preload(kb)
    with cache.using(ka), cache.using(kb):
        pass
    assert cache.is_loaded(ka) and cache.is_loaded(kb) and cache.swaps == 0


def test_a_stage_larger_than_the_budget_is_refused_with_both_sizes():
    a, b = linear(0), linear(1)
    budget = model_nbytes(a) + model_nbytes(b) - 1
    cache = ModelCache("cpu", ModelSettings(memory_budget=budget))
    cache.register([a], "stage 1 (map_gpu(encode, a))")
    message = r"stage 2 \(map_gpu\(encode, a_and_b\)\): its model takes 576 bytes .* gpu_memory_budget of 575 bytes"
    with pytest.raises(ValueError, match=message):
        cache.register([a, b], "stage 2 (map_gpu(encode, a_and_b))")


def test_unload_moves_to_host_and_refuses_a_model_in_use():
    a = linear(0)
    cache = ModelCache("cpu", ModelSettings(memory_budget=model_nbytes(a)))
    models = cache.register([a], "stage 1")
    with cache.using(models), pytest.raises(RuntimeError, match="in use"):
        cache.unload(models)
    cache.unload(models)
    assert not cache.is_loaded(models) and cache.loaded_bytes == 0


def test_threads_wait_for_room_while_another_thread_uses_the_model():
    """Thread 2 needs b while thread 1 computes with a (one-model budget): it waits, then swaps."""
    a, b = linear(0), linear(1)
    cache = ModelCache("cpu", ModelSettings(memory_budget=model_nbytes(a)))
    ka, kb = cache.register([a], "stage 1"), cache.register([b], "stage 2")
    holding, waiting_done = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with cache.using(ka):
            order.append("a in use")
            holding.set()
            # b cannot be loaded while a is in use: the other thread must still be waiting.
            assert not waiting_done.wait(0.2)
            order.append("a released")

    def second() -> None:
        holding.wait(GUARD_TIMEOUT_S)
        with cache.using(kb):
            order.append("b in use")
        waiting_done.set()

    def run_both() -> None:
        threads = [threading.Thread(target=f, name=f"streamproc-test-{i}") for i, f in enumerate([first, second])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(GUARD_TIMEOUT_S)

    run_guarded(run_both, GUARD_TIMEOUT_S, "two threads sharing a one-model cache")
    assert order == ["a in use", "a released", "b in use"]
    assert cache.swaps == 1


# -- the GPU worker's schedule --------------------------------------------------------------------


def simulate(arrivals: list[list[str]], budget_models: int = 1) -> tuple[list[str], int, list[int], int]:
    """Runs :class:`RoundSchedule` on batches named by their model (``"a3"``: model a).

    ``arrivals[t]`` arrive before compute step ``t``. Returns the compute order, the swaps
    (with an LRU cache of ``budget_models`` models), each batch's wait in computes, and the
    number of rounds.
    """
    schedule = RoundSchedule()
    loaded: list[str] = []
    pending: list[tuple[str, int]] = []
    order, waits, swaps, rounds = [], [], 0, 0
    for step in itertools.count():
        if step < len(arrivals):
            pending += [(name, step) for name in arrivals[step]]
        if not pending:
            if step >= len(arrivals):
                break
            continue
        rounds += schedule.left_in_round == 0
        chosen = schedule.pick(pending, lambda batch: batch[0][0] in loaded)
        name, arrived = pending.pop(chosen)
        model = name[0]
        if model in loaded:
            loaded.remove(model)
        elif len(loaded) == budget_models:
            loaded.pop(0)
            swaps += 1
        loaded.append(model)
        order.append(name)
        waits.append(step - arrived)
    return order, swaps, waits, rounds


def test_round_serves_the_loaded_model_first_then_swaps_once_per_model():
    order, swaps, _, rounds = simulate([["a1", "b1", "a2", "b2", "c1", "a3"]])
    assert order == ["a1", "a2", "a3", "b1", "b2", "c1"]
    assert rounds == 1
    assert swaps == 2  # a is loaded first (no eviction), then b and c: one swap each


def test_later_arrivals_do_not_overtake_a_waiting_round():
    # a-batches keep arriving, one per compute; b1 waits only for the a-batch of its round.
    arrivals = [["a1", "b1", "a2"]] + [[f"a{i}"] for i in range(3, 12)]
    order, swaps, _, _ = simulate(arrivals)
    assert order[:3] == ["a1", "a2", "b1"]
    assert swaps == 2  # to b, and back to a


@pytest.mark.parametrize("models", ["ab", "abc"])
def test_rounds_bound_swaps_and_waits_on_interleaved_arrivals(models):
    """Batches of every model arrive faster than they are computed: the worst case for waits."""
    arrivals = [[f"{m}{i}" for m in models] for i in range(20)]
    order, swaps, waits, rounds = simulate(arrivals)
    assert sorted(order) == sorted(name for step in arrivals for name in step)
    assert swaps <= len(models) * rounds  # at most one swap per model set and round
    # No starvation: a batch waits at most for the batches pending when it arrived (its round
    # and the rest of the round before it).
    pending_at_most = len(models) * len(arrivals)
    assert max(waits) < pending_at_most
    # Fewer swaps than first-come-first-served, which swaps on every batch here.
    assert swaps < len(order) - 1


def test_without_loaded_models_the_oldest_goes_first():
    schedule = RoundSchedule()
    assert schedule.pick(["b1", "c1"], lambda _: False) == 0
