"""Large tensors through shared memory (streamproc/backends/multiprocessing/tensor_transport.py).

Pure round trips in this process (pack here, unpack here: the same code a CPU worker and a
GPU worker run at either end of a pipe), then whole runs: no segment is left in /dev/shm after
a run that succeeds, one whose forward raises, and one whose CPU worker or GPU worker is
killed (SIGKILL) with batches in flight.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import streamproc as sp
from streamproc.backends.multiprocessing import tensor_transport
from streamproc.backends.multiprocessing.tensor_transport import SHM_DIR, ShmTensor, pack, segment_owner_prefix, unpack
from streamproc.errors import WorkerCrashedError
from tests.hang_guard import run_guarded
from tests.utils import UserError, assert_same_as_simple

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not tensor_transport.shm_available(), reason="needs /dev/shm (Linux)")

RUN_TIMEOUT_S = 120.0
BELOW, ABOVE = tensor_transport.SHM_MIN_BYTES // 2, tensor_transport.SHM_MIN_BYTES


def segments() -> list[str]:
    prefix = segment_owner_prefix(os.getpid())
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(prefix))


def tensor_of(nbytes: int, dtype: Any = torch.float32) -> Any:
    element = torch.empty((), dtype=dtype).element_size()
    return (torch.arange(nbytes // element) % 251).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int8, torch.bool, torch.bfloat16])
def test_a_tensor_above_the_crossover_goes_through_a_segment_and_comes_back_equal(dtype: Any) -> None:
    tensor = tensor_of(ABOVE, dtype)
    packed, names = pack(tensor, os.getpid())
    assert isinstance(packed, ShmTensor) and names == [packed.name] and segments() == names
    back = unpack(packed)
    assert segments() == []  # unlinked by the receiver at once
    assert back.dtype == dtype and back.shape == tensor.shape and back.stride() == tensor.stride()
    assert torch.equal(back, tensor)
    back[0] = back[1]  # the view is writable (forward may work in place)


def test_a_tensor_below_the_crossover_stays_in_the_message() -> None:
    tensor = tensor_of(BELOW)
    packed, names = pack(tensor, os.getpid())
    assert packed is tensor and names == [] and segments() == []
    assert unpack(packed) is tensor


def test_views_keep_their_shape_and_strides() -> None:
    base = tensor_of(4 * ABOVE).reshape(-1, 64)
    views = {"t": base.t(), "every_other_row": base[::2], "offset": base[3:, 5:], "expanded": base[:1].expand(1000, 64)}
    packed, names = pack(views, os.getpid(), min_bytes=1)
    assert len(names) == 4
    back = unpack(packed)
    for name, view in views.items():
        assert back[name].shape == view.shape and back[name].stride() == view.stride(), name
        assert torch.equal(back[name], view), name
    assert segments() == []


def test_nestings_mixed_sizes_and_other_leaves() -> None:
    big, small = tensor_of(ABOVE), tensor_of(BELOW)
    batch = {"ids": big, "mask": small, "names": ["a", "b"], "pair": (big, 3), "empty": torch.zeros(0, 8)}
    packed, names = pack(batch, os.getpid())
    assert len(names) == 2 and packed["mask"] is small and packed["names"] == ["a", "b"]
    back = unpack(packed)
    assert torch.equal(back["ids"], big) and torch.equal(back["pair"][0], big) and back["pair"][1] == 3
    assert back["empty"].shape == (0, 8)
    assert segments() == []


def test_tensors_that_need_grad_or_are_not_strided_stay_in_the_message() -> None:
    grad = tensor_of(ABOVE).requires_grad_()
    sparse = torch.eye(1024).to_sparse()
    packed, names = pack([grad, sparse], os.getpid(), min_bytes=1)
    assert names == [] and packed[0] is grad and packed[1] is sparse


def test_discard_and_sweep_remove_what_was_never_unpacked() -> None:
    packed, names = pack([tensor_of(ABOVE), tensor_of(ABOVE)], os.getpid())
    assert segments() == names
    tensor_transport.discard(packed)
    assert segments() == []
    # A segment whose creator is dead is swept; one of a live creator is not.
    dead = f"{segment_owner_prefix(os.getpid())}{2**22 + 12345}-0"
    live = f"{segment_owner_prefix(os.getpid())}{os.getpid()}-live"
    for name in (dead, live):
        Path(SHM_DIR, name).touch()
    try:
        assert tensor_transport.sweep_segments() == [dead]
        assert segments() == [live]
    finally:
        tensor_transport.discard_names([dead, live])


def test_a_failed_pack_leaves_no_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = tensor_transport._to_segment

    def second_fails(tensor: Any, main_pid: int, made: list[str]) -> ShmTensor:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("no space left on device")
        return original(tensor, main_pid, made)

    monkeypatch.setattr(tensor_transport, "_to_segment", second_fails)
    with pytest.raises(OSError, match="no space"):
        pack([tensor_of(ABOVE), tensor_of(ABOVE)], os.getpid())
    assert segments() == []


def big_batch(batch: list[int]) -> Any:
    return {"x": torch.arange(ABOVE // 8, dtype=torch.int64).reshape(len(batch), -1) + batch[0]}  # ABOVE bytes


def sums(records: list[int], outputs: Any) -> list[int]:
    return [int(row.sum()) for row in outputs]


def gpu_workers(cpu: int = 1, gpu: int = 1, **options: Any) -> dict[str, Any]:
    return {"backend": "multiprocessing", "num_cpu_workers": cpu, "num_gpu_workers": gpu,
            "gpu_worker_devices": ["cpu"] * gpu, "task_size": 4, **options}


def test_a_run_with_large_batches_and_outputs_leaves_no_segment() -> None:
    stream = sp.from_iterable(range(12)).map_gpu(big_batch, lambda b: b["x"] * 3, sums, batch_size=2)
    outputs = run_guarded(lambda: assert_same_as_simple(stream, **gpu_workers(2, 2)), RUN_TIMEOUT_S, "large tensors")
    assert len(outputs) == 12
    assert segments() == []


def test_a_failing_forward_leaves_no_segment() -> None:
    def forward(batch: Any) -> Any:
        if int(batch["x"][0, 0]) == 10:
            raise UserError("forward fails on record 10")
        return batch["x"] * 3

    stream = sp.from_iterable(range(24)).map_gpu(big_batch, forward, sums, batch_size=2).set_processing(**gpu_workers(2, 1))
    with pytest.raises(UserError, match="record 10"):
        run_guarded(stream.to_list, RUN_TIMEOUT_S, "a failing forward")
    assert segments() == []


@pytest.mark.parametrize("victim", ["cpu", "gpu"])
def test_a_killed_worker_leaves_no_segment(tmp_path: Path, victim: str) -> None:
    """The worker kills itself (SIGKILL, the OOM killer's signal) with large batches in flight."""
    marker = str(tmp_path / "killed")

    def prepare(batch: list[int]) -> Any:
        if victim == "cpu" and batch[0] == 12 and not os.path.exists(marker):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)  # batches 0..11 sent, some unanswered
        return big_batch(batch)

    def forward(batch: Any) -> Any:
        if victim == "gpu" and int(batch["x"][0, 0]) == 12:
            os.kill(os.getpid(), signal.SIGKILL)  # requests behind this one are in its pipe
        return batch["x"] * 3

    stream = sp.from_iterable(range(24)).map_gpu(prepare, forward, sums, batch_size=2).set_processing(**gpu_workers(1, 1))
    with pytest.raises(WorkerCrashedError):
        run_guarded(stream.to_list, RUN_TIMEOUT_S, f"a killed {victim} worker")
    assert segments() == []


def test_outputs_in_flight_to_a_killed_cpu_worker_are_swept() -> None:
    """The CPU worker dies in postprocess once answers it will never read are in /dev/shm:
    the main process unlinks them after the run (their creator, the GPU worker, is gone too)."""
    prefix = segment_owner_prefix(os.getpid())

    def postprocess(records: list[int], outputs: Any) -> list[int]:
        if records[0] == 12:
            deadline = time.monotonic() + 30.0
            own = f"{prefix}{os.getpid()}-"  # this worker's batches; the GPU worker's answers are the others
            while not [n for n in os.listdir(SHM_DIR) if n.startswith(prefix) and not n.startswith(own)]:
                assert time.monotonic() < deadline, "no answer in flight"
                time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGKILL)
        return sums(records, outputs)

    stream = sp.from_iterable(range(24)).map_gpu(big_batch, lambda b: b["x"] * 3, postprocess, batch_size=2)
    with pytest.raises(WorkerCrashedError):
        run_guarded(stream.set_processing(**gpu_workers(1, 1)).to_list, RUN_TIMEOUT_S, "answers in flight")
    assert segments() == []
