"""The Ray backend's options and sizing, as pure units (no cluster; run in every env, Ray or not)."""

from __future__ import annotations

import sys
from typing import Any

import pytest

import streamproc as sp
from streamproc.backends.ray.cluster import ActorSizing, size_actors
from streamproc.plan import build_plan


@pytest.mark.parametrize("address", [None, "auto", "10.0.0.1:6379", "ray://head:10001", " auto "])
def test_valid_ray_addresses(address: Any) -> None:
    options = sp.from_iterable([]).set_processing(ray_address=address).options
    assert options.ray_address == (address.strip() if isinstance(address, str) else None)


@pytest.mark.parametrize("address", ["", "   ", 6379, "head 6379", ["auto"]])
def test_invalid_ray_address_is_refused_at_set_processing(address: Any) -> None:
    with pytest.raises(ValueError, match="ray_address must be None"):
        sp.from_iterable([]).set_processing(ray_address=address)


def test_backend_ray_without_ray_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError, match=r"pip install 'streamproc\[ray\]'"):
        sp.from_iterable([]).set_processing(backend="ray")


def test_join_cluster_without_ray_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamproc.backends.ray.cluster import join_cluster

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'streamproc\[ray\]'"):
        join_cluster(None)


def test_the_registry_finds_the_ray_backend_without_importing_ray() -> None:
    from streamproc.backends.registry import get_backend

    had_ray = "ray" in sys.modules
    backend = get_backend("ray")
    assert backend.capabilities.writes_in_workers and backend.capabilities.separate_processes
    assert had_ray or "ray" not in sys.modules


def plan_of(**options: Any) -> Any:
    stream = sp.from_iterable([]).map_gpu(lambda r: r, lambda b: b) if options.pop("gpu", False) else sp.from_iterable([])
    return build_plan(stream.set_processing(**options))


def test_sizing_cpu_workers_default_to_the_cluster_cpus() -> None:
    assert size_actors(plan_of(num_cpu_workers=3), cluster_cpus=2, cluster_gpus=0).num_cpu_workers == 3
    assert size_actors(plan_of(), cluster_cpus=6, cluster_gpus=0).num_cpu_workers == 6  # default: the cluster's CPUs


def test_sizing_gpu_workers() -> None:
    sizing = size_actors(plan_of(gpu=True, num_cpu_workers=2, num_gpu_workers=4), cluster_cpus=2, cluster_gpus=2)
    assert sizing == ActorSizing(2, (None, None, None, None), 0.5)
    on_cpu = size_actors(plan_of(gpu=True, num_cpu_workers=1, gpu_worker_devices=["cpu"]), cluster_cpus=2, cluster_gpus=0)
    assert on_cpu.gpu_devices == ("cpu",) and on_cpu.gpus_per_gpu_worker == 0.0
    # No map_gpu stage: no GPU worker actor, whatever the options say.
    assert size_actors(plan_of(num_gpu_workers=2), cluster_cpus=2, cluster_gpus=2).gpu_devices == ()


def test_gpu_workers_on_cuda_without_cluster_gpus_are_refused() -> None:
    with pytest.raises(ValueError, match="needs GPUs in the Ray cluster"):
        size_actors(plan_of(gpu=True, num_gpu_workers=1), cluster_cpus=2, cluster_gpus=0)


def test_device_groups_are_refused_on_ray() -> None:
    with pytest.raises(ValueError, match="device group"):
        size_actors(plan_of(gpu=True, gpu_worker_devices=[("cpu", "cpu")]), cluster_cpus=2, cluster_gpus=2)


@pytest.mark.ray  # needs Ray installed, not a cluster: refused before joining one
def test_task_timeout_is_refused_at_run_start() -> None:
    pytest.importorskip("ray")
    stream = sp.from_iterable(range(3)).set_processing(backend="ray", task_timeout=5)
    with pytest.raises(ValueError, match="task_timeout=5 is not available with backend='ray'"):
        stream.to_list()


def test_cpu_actors_are_spread_over_the_nodes_by_their_cpus() -> None:
    from streamproc.backends.ray.cluster import spread_over_nodes

    assert spread_over_nodes(2, {"head": 1, "worker": 1}) == ["head", "worker"]
    assert spread_over_nodes(6, {"a": 4, "b": 2, "gpu-only": 0}) == ["a", "b", "a", "a", "b", "a"]
    assert spread_over_nodes(1, {"no-cpu": 0}) == [None]  # Ray places it
