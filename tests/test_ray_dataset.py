"""``sp.from_ray_dataset`` and ``Stream.to_ray_dataset`` (Ray Data interop; marked ``ray``)."""

from __future__ import annotations

import sys
from typing import Any

import pytest

import streamproc as sp
from tests.hang_guard import run_guarded
from tests.ray_cluster import wait_until_only_warm_actors

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

ray = pytest.importorskip("ray")
RUN_TIMEOUT_S = 120.0


def test_from_ray_dataset_streams_its_rows_in_order_on_every_backend() -> None:
    ds = ray.data.range(500)
    stream = sp.from_ray_dataset(ds).map(lambda r: r["id"] * 2)
    assert stream.to_list() == [2 * i for i in range(500)]  # rerunnable: each run iterates the dataset anew
    out = run_guarded(lambda: stream.set_processing(backend="ray", num_cpu_workers=2).to_list(), RUN_TIMEOUT_S, "ray")
    assert out == [2 * i for i in range(500)]
    assert wait_until_only_warm_actors() == []


def _assigned_resources(_: Any) -> dict[str, float]:
    return dict(ray.get_runtime_context().get_assigned_resources())


def test_cpu_actors_hold_no_cpu_that_ray_data_tasks_need() -> None:
    # The cause of the flaky test above: CPU actors that reserved one CPU each took both CPUs
    # of the test cluster, so the Ray Data read tasks behind from_ray_dataset (1 CPU each) never
    # ran: a deadlock whenever every CPU was free when the run sized its actors.
    stream = sp.from_iterable(range(4)).set_processing(backend="ray", num_cpu_workers=2, task_size=1)
    assigned = run_guarded(lambda: stream.map(_assigned_resources).to_list(), RUN_TIMEOUT_S, "ray")
    assert assigned == [{}] * 4  # no CPU (nor anything else) reserved by the actors


def test_to_ray_dataset_round_trip() -> None:
    ds = sp.from_iterable(range(100)).map(lambda x: {"x": x, "y": str(x)}).to_ray_dataset()
    assert isinstance(ds, ray.data.Dataset)
    assert sorted(row["x"] for row in ds.take_all()) == list(range(100))
    assert ds.count() == 100


def test_from_ray_dataset_refuses_other_objects() -> None:
    with pytest.raises(TypeError, match=r"needs a ray\.data\.Dataset, got list"):
        sp.from_ray_dataset([1, 2])


def test_without_ray_the_error_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'streamproc\[ray\]'"):
        sp.from_ray_dataset(object())
    stream: Any = sp.from_iterable([{"a": 1}])
    with pytest.raises(ImportError, match=r"pip install 'streamproc\[ray\]'"):
        stream.to_ray_dataset()
