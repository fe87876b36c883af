"""The Ray backend on a 2-node cluster on one machine (``ray.cluster_utils.Cluster``, 2 raylets).

Checks that tasks ran on several nodes and that parquet parts were written by several nodes,
with output identical to the simple backend's. Run by ``tox -e ray`` (marked ``ray``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq
import pytest

import streamproc as sp
from tests.hang_guard import run_guarded
from tests.ray_cluster import OBJECT_STORE_BYTES, reconnect, wait_until_only_warm_actors
from tests.ray_fakes import TagWithNodeOnceAllStarted

pytestmark = [pytest.mark.ray]

ray = pytest.importorskip("ray")
RUN_TIMEOUT_S = 180.0
#: One CPU per raylet: the two CPU worker actors (one CPU each) must go to different nodes.
NODE_CPUS = 1


@pytest.fixture
def two_nodes(ray_session: Any) -> Iterator[Any]:
    """A head and a worker raylet of one CPU each; this process their driver (then the session cluster again)."""
    from ray.cluster_utils import Cluster

    session_address = ray.get_runtime_context().gcs_address
    ray.shutdown()
    node_args = {"num_cpus": NODE_CPUS, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    try:
        cluster.add_node(**{k: v for k, v in node_args.items() if k != "include_dashboard"})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield cluster
        assert wait_until_only_warm_actors() == []
    finally:
        ray.shutdown()
        cluster.shutdown()
        reconnect(session_address)


def numbers() -> sp.Stream:
    return sp.from_iterable(range(2000)).set_processing(task_size=100)


def test_tasks_run_and_parts_are_written_on_several_nodes(two_nodes: Any, tmp_path: Any) -> None:
    options = {"backend": "ray", "num_cpu_workers": 2}
    def tagged(barrier: str) -> sp.Stream:  # each run: its own barrier (the second runs on the warm actors)
        (tmp_path / barrier).mkdir()
        return numbers().map(TagWithNodeOnceAllStarted(str(tmp_path / barrier), actors=2))

    # deterministic: the driver writes, in order; the records say which node ran each task
    records = run_guarded(lambda: tagged("run").set_processing(**options).to_list(), RUN_TIMEOUT_S, "2-node run")
    assert [r["x"] for r in records] == numbers().to_list()
    assert len({r["node"] for r in records}) == 2

    # deterministic=False: each actor writes whole parts where it runs
    out, expected_dir = tmp_path / "ray", tmp_path / "simple"
    numbers().map(lambda x: {"x": x}).set_processing(backend="simple").write_parquet(str(expected_dir), rows_per_file=200)
    run_guarded(
        lambda: tagged("write").set_processing(**options, deterministic=False).write_parquet(str(out), rows_per_file=200),
        RUN_TIMEOUT_S, "2-node write",
    )
    names = sorted(n for n in os.listdir(out) if n.endswith(".parquet"))
    assert names == sorted(n for n in os.listdir(expected_dir) if n.endswith(".parquet")) and len(names) == 10
    writers = set()
    for name in names:
        table = pq.read_table(out / name)
        part_nodes = set(table.column("node").to_pylist())
        assert len(part_nodes) == 1, (name, part_nodes)  # a part is written by the one actor that ran its tasks
        writers |= part_nodes
        assert table.select(["x"]).equals(pq.read_table(expected_dir / name)), name
    assert len(writers) == 2  # parts were written on both nodes
