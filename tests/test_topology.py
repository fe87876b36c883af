"""topology.py: GPU worker devices, the CPU -> GPU channel graph and the plan split, as pure
functions (no process is started; CUDA is never queried: ``cuda_device_count`` is passed in,
or torch's answer is faked).
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import warnings
from typing import Any

import pytest

import streamproc as sp
from streamproc.backends.multiprocessing.messages import ChannelKey, WorkerId
from streamproc.backends.multiprocessing.topology import Topology, build_topology, resolve_gpu_devices
from streamproc.execution.schedule import get_dispatch_schedule
from streamproc.execution.serialization import dumps_plan
from streamproc.execution.split import ForwardStage, split_plan
from streamproc.ops import Map, MapGPU
from streamproc.plan import Plan, build_plan
from tests.utils import identity

torch = pytest.importorskip("torch")

PAIRS = [(p, c) for p in range(1, 9) for c in range(1, 9)]


def prepare(records: list[int]) -> Any:
    return torch.tensor(records)


def postprocess(records: list[int], outputs: Any) -> list[int]:
    return outputs.tolist()


#: Every weight of MarkedModel, so its weights are easy to find in pickled bytes.
MARKER_WEIGHT = 20240.5
MARKER_BYTES = struct.pack("<8f", *[MARKER_WEIGHT] * 8)


class MarkedModel(torch.nn.Module):
    """A model whose weights are easy to find in pickled bytes (``MARKER_BYTES``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        with torch.no_grad():
            self.linear.weight.fill_(MARKER_WEIGHT)

    def forward(self, batch: Any) -> Any:
        return batch


def gpu_plan(**options: Any) -> Plan:
    stream = sp.from_iterable(range(10)).map_gpu(prepare, MarkedModel(), postprocess, batch_size=4)
    return build_plan(stream.set_processing(**options))


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# -- resolve_gpu_devices -----------------------------------------------------------------------


@pytest.mark.parametrize("cuda_device_count", [0, 2])
def test_no_gpu_workers_without_a_map_gpu_stage(no_warnings, cuda_device_count):
    plan = build_plan(sp.from_iterable(range(3)).map(identity).set_processing(num_gpu_workers=2))
    assert resolve_gpu_devices(plan, cuda_device_count=cuda_device_count) == []


def test_num_gpu_workers_zero_runs_forward_in_the_cpu_workers(no_warnings):
    assert resolve_gpu_devices(gpu_plan(num_gpu_workers=0), cuda_device_count=4) == []
    assert resolve_gpu_devices(gpu_plan(num_gpu_workers=0, gpu_worker_devices=["cuda:1"]), cuda_device_count=4) == []


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"gpu_worker_devices": ["cuda:1", "cuda:0"]}, ["cuda:1", "cuda:0"]),
        ({"gpu_worker_devices": ["cpu"], "num_gpu_workers": 3}, ["cpu", "cpu", "cpu"]),
        ({"gpu_worker_devices": ["cuda:0", "cuda:1"], "num_gpu_workers": 3}, ["cuda:0", "cuda:1", "cuda:0"]),
        ({"gpu_worker_devices": ["cuda:0", "cuda:1"], "num_gpu_workers": 1}, ["cuda:0"]),
    ],
    ids=["as-given", "cpu-cycled", "cuda-cycled", "fewer-workers"],
)
@pytest.mark.parametrize("cuda_device_count", [2, 3])
def test_explicit_devices_win(no_warnings, options, expected, cuda_device_count):
    # Explicit devices that exist are taken as they are, and never warn.
    assert resolve_gpu_devices(gpu_plan(**options), cuda_device_count=cuda_device_count) == expected


@pytest.mark.parametrize(
    ("devices", "cuda_device_count", "match"),
    [
        (["cuda:0"], 0, r"gpu_worker_devices: 'cuda:0' does not exist here: no CUDA device is visible"),
        (["cuda"], 0, r"gpu_worker_devices: 'cuda' does not exist here: no CUDA device is visible"),
        (["cpu", "cuda:1"], 1, r"'cuda:1' does not exist here: 1 CUDA device is visible \(cuda:0"),
        (["cuda:0", "cuda:4"], 4, r"'cuda:4' does not exist here: 4 CUDA devices are visible \(cuda:0 to cuda:3"),
    ],
)
def test_cuda_devices_that_are_not_visible_are_refused(monkeypatch, devices, cuda_device_count, match):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError, match=match):
        resolve_gpu_devices(gpu_plan(gpu_worker_devices=devices), cuda_device_count=cuda_device_count)


def test_the_refusal_names_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match=r"CUDA_VISIBLE_DEVICES=''"):
        resolve_gpu_devices(gpu_plan(gpu_worker_devices=["cuda:0"]), cuda_device_count=0)


def test_a_device_beyond_the_listed_workers_is_not_checked(no_warnings):
    # num_gpu_workers=1 uses only the first device listed.
    plan = gpu_plan(gpu_worker_devices=["cuda:0", "cuda:7"], num_gpu_workers=1)
    assert resolve_gpu_devices(plan, cuda_device_count=1) == ["cuda:0"]


def test_mps_is_refused_where_it_is_not_available(no_warnings):
    plan = gpu_plan(gpu_worker_devices=["mps"])
    with pytest.raises(ValueError, match=r"gpu_worker_devices: 'mps' is not available here"):
        resolve_gpu_devices(plan, mps_available=False)
    assert resolve_gpu_devices(plan, mps_available=True) == ["mps"]


def test_device_checks_ask_torch_by_default(monkeypatch):
    """Without the test parameters, what torch sees decides (here faked: no CUDA, no MPS)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda:0' does not exist here"):
        resolve_gpu_devices(gpu_plan(gpu_worker_devices=["cuda:0"]))
    with pytest.raises(ValueError, match="'mps' is not available"):
        resolve_gpu_devices(gpu_plan(gpu_worker_devices=["mps"]))
    assert resolve_gpu_devices(gpu_plan(gpu_worker_devices=["cpu"])) == ["cpu"]


def test_cpu_devices_never_import_torch():
    code = (
        "import sys\n"
        "import streamproc as sp\n"
        "from streamproc.plan import build_plan\n"
        "from streamproc.backends.multiprocessing.topology import resolve_gpu_devices\n"
        "stream = sp.from_iterable([1]).map_gpu(len, len).set_processing(gpu_worker_devices=['cpu'], num_gpu_workers=2)\n"
        "assert resolve_gpu_devices(build_plan(stream)) == ['cpu', 'cpu']\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("num_gpu_workers", "cuda_device_count", "expected"),
    [
        (None, 0, []),
        (None, 1, ["cuda:0"]),
        (None, 3, ["cuda:0", "cuda:1", "cuda:2"]),
        (2, 4, ["cuda:0", "cuda:1"]),
        (5, 2, ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]),
    ],
)
def test_default_devices_are_the_visible_cuda_devices(no_warnings, num_gpu_workers, cuda_device_count, expected):
    plan = gpu_plan(num_gpu_workers=num_gpu_workers)
    assert resolve_gpu_devices(plan, cuda_device_count=cuda_device_count) == expected


@pytest.mark.parametrize("num_gpu_workers", [1, 3])
def test_gpu_workers_without_cuda_run_on_the_cpu_with_a_warning(num_gpu_workers):
    with pytest.warns(UserWarning, match=f"num_gpu_workers={num_gpu_workers} but no CUDA device is visible") as record:
        devices = resolve_gpu_devices(gpu_plan(num_gpu_workers=num_gpu_workers), cuda_device_count=0)
    assert devices == ["cpu"] * num_gpu_workers
    assert len(record) == 1
    assert record[0].filename == __file__  # the warning points at the caller, not at streamproc


def test_cuda_device_count_defaults_to_what_torch_sees(no_warnings, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_gpu_devices(gpu_plan()) == ["cuda:0", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_gpu_devices(gpu_plan()) == []


# -- device groups (model parallel: one GPU worker owns several devices) ----------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"gpu_worker_devices": [("cuda:0", "cuda:1")]}, [("cuda:0", "cuda:1")]),
        ({"gpu_worker_devices": [("cuda:0", "cuda:1")], "num_gpu_workers": 2}, [("cuda:0", "cuda:1")] * 2),
        ({"gpu_worker_devices": ["cuda:0", ("cuda:1", "cuda:2")], "num_gpu_workers": 3},
         ["cuda:0", ("cuda:1", "cuda:2"), "cuda:0"]),
        ({"gpu_worker_devices": [("cpu", "cpu")]}, [("cpu", "cpu")]),
    ],
    ids=["one-group", "group-cycled", "mixed-cycled", "cpu-twice"],
)
def test_a_device_group_is_one_gpu_worker(no_warnings, options, expected):
    assert resolve_gpu_devices(gpu_plan(**options), cuda_device_count=3) == expected


@pytest.mark.parametrize(
    ("group", "match"),
    [
        (("cuda:0", "cuda:3"), r"gpu_worker_devices: 'cuda:3' does not exist here: 3 CUDA devices are visible"),
        (("cpu", "mps"), r"gpu_worker_devices: 'mps' is not available here"),
        (("cuda:1", "cuda:1"), r"the group \('cuda:1', 'cuda:1'\) names cuda:1 twice: a group splits a model over distinct"),
        (("cuda", "cuda:0"), r"names cuda:0 twice.*only 'cpu' may repeat"),
    ],
    ids=["unknown-cuda", "no-mps", "cuda-twice", "cuda-is-cuda0"],
)
def test_each_device_of_a_group_is_checked(monkeypatch, group, match):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError, match=match):
        resolve_gpu_devices(gpu_plan(gpu_worker_devices=[group]), cuda_device_count=3, mps_available=False)


def test_build_topology_counts_a_group_as_one_worker():
    topology = build_topology(3, [("cuda:0", "cuda:1"), "cuda:2"])
    assert topology.gpu_devices == (("cuda:0", "cuda:1"), "cuda:2")
    assert topology.cycles == tuple(tuple(get_dispatch_schedule(cpu, 3, 2)) for cpu in range(3))


def test_a_group_of_cuda_devices_is_never_forked(monkeypatch):
    from streamproc.backends.multiprocessing.backend import pool_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    pool = pool_for(gpu_plan(gpu_worker_devices=[("cuda:0", "cuda:1")], num_cpu_workers=1))
    assert pool.topology.gpu_devices == (("cuda:0", "cuda:1"),)
    assert pool.gpu_start_method != "fork"


# -- build_topology, channels, peers_of_gpu --------------------------------------------------


def test_build_topology_example():
    topology = build_topology(4, ["cuda:0", "cuda:1"])
    assert topology == Topology(4, ("cuda:0", "cuda:1"), ((0,), (0,), (1,), (1,)))
    cpu, gpu = WorkerId("cpu", 0), WorkerId("gpu", 0)
    assert topology.channels[0] == ChannelKey(cpu, gpu)
    assert [(key.src.index, key.dst.index) for key in topology.channels] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert [topology.peers_of_gpu(g) for g in range(2)] == [[0, 1], [2, 3]]


def test_topology_without_gpu_workers_has_no_channel():
    topology = build_topology(3, [])
    assert topology.cycles == ((), (), ())
    assert topology.channels == []
    assert topology.gpu_devices == ()


@pytest.mark.parametrize(("cpu", "gpu"), PAIRS)
def test_cycles_are_the_dispatch_schedule(cpu, gpu):
    topology = build_topology(cpu, ["cpu"] * gpu)
    assert topology.num_cpu_workers == cpu
    assert topology.cycles == tuple(tuple(get_dispatch_schedule(p, cpu, gpu)) for p in range(cpu))


@pytest.mark.parametrize(("cpu", "gpu"), PAIRS)
def test_channels_link_each_cpu_worker_to_the_gpu_workers_of_its_cycle_once(cpu, gpu):
    topology = build_topology(cpu, ["cpu"] * gpu)
    channels = topology.channels
    assert len(set(channels)) == len(channels)  # one pipe pair per (cpu, gpu) pair
    assert all(key.src.kind == "cpu" and key.dst.kind == "gpu" for key in channels)
    assert {(key.src.index, key.dst.index) for key in channels} == {
        (p, c) for p, cycle in enumerate(topology.cycles) for c in cycle
    }
    # As few pipes as any evenly balanced schedule allows (see NOTE [ streamproc dispatch schedule ]).
    assert len(channels) == cpu + gpu - math.gcd(cpu, gpu)


@pytest.mark.parametrize(("cpu", "gpu"), PAIRS)
def test_peers_of_gpu_are_its_channel_sources(cpu, gpu):
    topology = build_topology(cpu, ["cpu"] * gpu)
    for g in range(gpu):
        peers = topology.peers_of_gpu(g)
        assert peers == sorted(key.src.index for key in topology.channels if key.dst.index == g)
        # Every GPU worker is fed (an unfed one would idle), by consecutive CPU workers.
        assert peers and peers == list(range(peers[0], peers[-1] + 1))
        assert len(peers) <= math.ceil((cpu + gpu - math.gcd(cpu, gpu)) / gpu)
    assert sorted({p for g in range(gpu) for p in topology.peers_of_gpu(g)}) == list(range(cpu))
    assert topology.peers_of_gpu(gpu) == []


# -- split_plan -----------------------------------------------------------------------------


def two_stage_plan(model: Any) -> Plan:
    stream = (
        sp.from_iterable(range(10))
        .map(identity)
        .map_gpu(prepare, model, postprocess, batch_size="8 tokens", batch_by=len)
        .map(identity)
        .map_gpu(prepare, identity, batch_size=3)
    )
    return build_plan(stream)


def test_split_plan_replaces_forward_and_keeps_the_rest():
    model = MarkedModel()
    plan = two_stage_plan(model)
    cpu_plan, forwards = split_plan(plan)

    assert [(s.index, s.name) for s in cpu_plan.stages] == [(s.index, s.name) for s in plan.stages]
    assert (cpu_plan.source, cpu_plan.options, cpu_plan.task_size, cpu_plan.chunk_size) == (
        plan.source,
        plan.options,
        plan.task_size,
        plan.chunk_size,
    )
    assert [type(op) for op in cpu_plan.ops] == [Map, MapGPU, Map, MapGPU]
    for index in (0, 2):
        assert cpu_plan.ops[index] is plan.ops[index]
    for index in (1, 3):
        op, original = cpu_plan.ops[index], plan.ops[index]
        assert op.forward is not original.forward
        assert (op.prepare_batch, op.postprocess, op.batch_size, op.batch_by) == (
            original.prepare_batch,
            original.postprocess,
            original.batch_size,
            original.batch_by,
        )
        with pytest.raises(RuntimeError, match="runs on GPU workers"):
            op.forward(torch.zeros(1))

    # For GPU workers: the original forwards, by stage index (1-based).
    assert forwards == {
        2: ForwardStage(2, plan.stages[1].name, model, plan.ops[1].batch_size),
        4: ForwardStage(4, plan.stages[3].name, identity, plan.ops[3].batch_size),
    }
    assert forwards[2].forward is model
    assert plan.ops[1].forward is model  # the plan itself is unchanged


def test_split_plan_of_a_plan_without_map_gpu_is_the_same_plan():
    plan = build_plan(sp.from_iterable(range(3)).map(identity).filter(bool))
    cpu_plan, forwards = split_plan(plan)
    assert cpu_plan == plan and forwards == {}


def test_cpu_workers_plan_does_not_carry_the_model():
    plan = two_stage_plan(MarkedModel())
    cpu_plan, forwards = split_plan(plan)
    assert MARKER_BYTES in dumps_plan(plan, plan)
    assert MARKER_BYTES not in dumps_plan(cpu_plan, plan)
    assert MARKER_BYTES in dumps_plan(forwards, plan)
