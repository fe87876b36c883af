"""map_gpu with GPU workers, end to end, run on the CPU (``gpu_worker_devices=["cpu"] * k``).

CPU workers run ``prepare_batch`` and ``postprocess``, GPU workers run ``forward`` (see
design.md section 3); a GPU worker on device "cpu" runs the same code as one on CUDA, minus
pinned memory and the side copy stream. Every deterministic run is compared with the simple
backend, batch composition included. Models have small integer weights and inputs, so every
float result is exact (also in bfloat16, for values below 256) whatever the kernel or thread
count, and outputs compare with ``==``.

Runs use the default start method (fork for GPU workers on the CPU: spawning a process costs
2-4 s here, mostly importing torch), except one spawn case. The autouse fixture of
``tests/conftest.py`` fails any test that leaves a process or a ``streamproc-*`` thread behind.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import streamproc as sp
from tests.utils import UserError, assert_records_equal, assert_same_as_simple, collect_until_error, fn_raises, stage_notes

torch = pytest.importorskip("torch")

#: A crashed GPU worker must be reported within this long (detection itself takes well under a
#: second; the rest absorbs a loaded 2-core machine).
CRASH_REPORT_TIMEOUT_S = 20.0

#: (CPU workers, GPU workers): fewer, as many and more GPU workers than CPU workers.
WORKER_COUNTS = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]


def gpu_workers(cpu: int, gpu: int, **options: Any) -> dict[str, Any]:
    """``set_processing`` kwargs: ``cpu`` CPU workers and ``gpu`` GPU workers on the CPU."""
    return {
        "backend": "multiprocessing",
        "num_cpu_workers": cpu,
        "num_gpu_workers": gpu,
        "gpu_worker_devices": ["cpu"] * gpu,
        **options,
    }


def counts_id(counts: tuple[int, int]) -> str:
    return f"{counts[0]}cpu-{counts[1]}gpu"


def make_records(n: int) -> list[dict[str, Any]]:
    """Records with 1 to 6 words, so that token batch sizes give batches of varied lengths."""
    return [{"id": i, "text": " ".join(["w"] * (1 + (i * 7) % 6))} for i in range(n)]


def count_words(record: dict[str, Any]) -> int:
    return len(record["text"].split())


def expected_score(record: dict[str, Any]) -> float:
    return 2.0 * record["id"] + 3.0 * count_words(record) + 1.0


# -- callables (module level: they pickle by reference under every start method) -------------


def encode(records: list[dict[str, Any]]) -> dict[str, Any]:
    """prepare_batch: one int64 tensor per feature (the numpy form is covered in test_map_gpu)."""
    return {
        "id": torch.tensor([r["id"] for r in records], dtype=torch.int64),
        "n_words": torch.tensor([count_words(r) for r in records], dtype=torch.int64),
    }


class ScoreModel(torch.nn.Module):
    """``score = 2 * id + 3 * n_words + 1``, exactly; dropout would scramble it in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[2.0, 3.0]]))
            self.linear.bias.copy_(torch.tensor([1.0]))
        self.dropout = torch.nn.Dropout(p=0.5)

    def forward(self, batch: dict[str, Any]) -> Any:
        features = torch.stack([batch["id"], batch["n_words"]], dim=1).float()
        return self.linear(self.dropout(features)).squeeze(1)


def attach_score(records: list[dict[str, Any]], scores: Any) -> list[dict[str, Any]]:
    """postprocess showing the batch composition: each record gets the ids of its batch."""
    ids = tuple(r["id"] for r in records)
    return [{**r, "score": float(s), "batch": ids} for r, s in zip(records, scores.tolist())]


def attach_score_only(records: list[dict[str, Any]], scores: Any) -> list[dict[str, Any]]:
    return [{**r, "score": float(s)} for r, s in zip(records, scores.tolist())]


def score_stream(n: int = 60, **map_gpu_kwargs: Any) -> sp.Stream:
    kwargs = {"batch_size": 4, **map_gpu_kwargs}
    return sp.from_iterable(make_records(n)).map_gpu(encode, ScoreModel(), attach_score, **kwargs).set_processing(task_size=8)


# -- equivalence with the simple backend --------------------------------------------------------


@pytest.mark.parametrize("counts", WORKER_COUNTS, ids=counts_id)
def test_deterministic_output_is_the_simple_backends(counts):
    out = assert_same_as_simple(score_stream(), **gpu_workers(*counts))
    assert [r["id"] for r in out] == list(range(60))
    assert all(r["score"] == expected_score(r) for r in out)
    # Batches of 4 within tasks of 8: the composition the simple backend gives.
    assert list(dict.fromkeys(r["batch"] for r in out)) == [tuple(range(i, i + 4)) for i in range(0, 60, 4)]


@pytest.mark.parametrize("counts", [(2, 1), (3, 2)], ids=counts_id)
def test_non_deterministic_output_is_the_same_multiset(counts):
    # No batch composition in the records: a non-deterministic run may compose batches otherwise.
    stream = sp.from_iterable(make_records(80)).map_gpu(encode, ScoreModel(), attach_score_only, batch_size=3)
    out = assert_same_as_simple(stream.set_processing(task_size=6), **gpu_workers(*counts, deterministic=False))
    assert sorted(r["id"] for r in out) == list(range(80))


@pytest.mark.parametrize(
    ("batch_size", "batch_by"),
    [("12 tokens", count_words), ("12 padded_tokens", count_words), ("9 tokens", "n_words")],
    ids=["tokens-callable", "padded-callable", "tokens-field"],
)
@pytest.mark.parametrize("counts", [(1, 2), (3, 1)], ids=counts_id)
def test_token_batch_sizes(counts, batch_size, batch_by):
    records = [{**r, "n_words": count_words(r)} for r in make_records(50)]
    stream = sp.from_iterable(records).map_gpu(encode, ScoreModel(), attach_score, batch_size=batch_size, batch_by=batch_by)
    out = assert_same_as_simple(stream.set_processing(task_size=10), **gpu_workers(*counts))
    budget, unit = int(batch_size.split()[0]), batch_size.split()[1]
    batches = list(dict.fromkeys(r["batch"] for r in out))
    assert len(batches) > 50 // 10  # token budgets cut the tasks further
    for batch in batches:
        sizes = [count_words(records[i]) for i in batch]
        size = sum(sizes) if unit == "tokens" else max(sizes) * len(sizes)
        assert size <= budget or len(batch) == 1, (batch, sizes)


# -- two map_gpu stages, with CPU ops between them ---------------------------------------------


def score_is_odd(record: dict[str, Any]) -> bool:
    return int(record["score"]) % 2 == 1


def add_hundred(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "shifted": record["score"] + 100.0}


def encode_shifted(records: list[dict[str, Any]]) -> Any:
    return torch.tensor([[r["shifted"], float(count_words(r))] for r in records])


class MixModel(torch.nn.Module):
    """A second, different model: ``mixed = shifted - n_words`` (stages must not be mixed up)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, -1.0]]))

    def forward(self, batch: Any) -> Any:
        return self.linear(batch).squeeze(1)


def attach_mixed(records: list[dict[str, Any]], mixed: Any) -> list[dict[str, Any]]:
    ids = tuple(r["id"] for r in records)
    return [{**r, "mixed": float(m), "batch2": ids} for r, m in zip(records, mixed.tolist())]


@pytest.mark.parametrize("counts", [(1, 1), (2, 2), (3, 1)], ids=counts_id)
def test_two_map_gpu_stages_with_cpu_ops_between(counts):
    stream = (
        sp.from_iterable(make_records(70))
        .map_gpu(encode, ScoreModel(), attach_score, batch_size=4)
        .filter(score_is_odd)
        .map(add_hundred)
        .map_gpu(encode_shifted, MixModel(), attach_mixed, batch_size="10 tokens", batch_by=count_words)
        .set_processing(task_size=10)
    )
    out = assert_same_as_simple(stream, **gpu_workers(*counts))
    assert out and all(score_is_odd(r) for r in out)
    assert all(r["mixed"] == expected_score(r) + 100.0 - count_words(r) for r in out)
    # Stage 2 batches records that stage 1 batched differently.
    assert {r["batch"] for r in out} != {r["batch2"] for r in out}


# -- outputs and the default postprocess --------------------------------------------------------


def as_matrix(batch: dict[str, Any]) -> Any:
    return torch.stack([batch["id"], batch["n_words"]], dim=1) * 10


def as_dict(batch: dict[str, Any]) -> dict[str, Any]:
    return {"id": batch["id"], "double": batch["n_words"].float() * 2}


def as_tuple(batch: dict[str, Any]) -> tuple[Any, Any]:
    return batch["id"] + 1, batch["n_words"] > 3


@pytest.mark.parametrize(
    ("forward", "check"),
    [
        (as_matrix, lambda row, r: isinstance(row, np.ndarray) and row.tolist() == [10 * r["id"], 10 * count_words(r)]),
        (as_dict, lambda row, r: row == {"id": r["id"], "double": 2.0 * count_words(r)}),
        (as_tuple, lambda row, r: row == (r["id"] + 1, count_words(r) > 3)),
    ],
    ids=["tensor", "dict", "tuple"],
)
@pytest.mark.parametrize("counts", [(1, 2), (2, 1)], ids=counts_id)
def test_default_postprocess_splits_outputs_per_record(counts, forward, check):
    records = make_records(30)
    stream = sp.from_iterable(records).map_gpu(encode, forward, batch_size=4).set_processing(task_size=8)
    out = assert_same_as_simple(stream, **gpu_workers(*counts))
    assert len(out) == len(records)
    assert all(check(row, r) for row, r in zip(out, records)), out[:3]


class ScoreAndDtype(ScoreModel):
    """The score, and per row whether forward computed it in bfloat16 (autocast on)."""

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        score = super().forward(batch)
        return {"score": score, "bf16": torch.full(score.shape, score.dtype == torch.bfloat16)}


@pytest.mark.parametrize(
    ("autocast", "expect_bf16"), [(True, True), (torch.bfloat16, True), (None, False)], ids=["True", "bfloat16", "off"]
)
def test_autocast_runs_forward_in_bfloat16_on_the_cpu(autocast, expect_bf16):
    stream = sp.from_iterable(make_records(40)).map_gpu(encode, ScoreAndDtype(), batch_size=5)
    stream = stream.set_processing(task_size=10, autocast=autocast)
    out = assert_same_as_simple(stream, **gpu_workers(2, 1))
    assert [row["bf16"] for row in out] == [expect_bf16] * 40
    # bfloat16 is exact for these small integers; its rows arrive as float32.
    assert [row["score"] for row in out] == [expected_score(r) for r in make_records(40)]


# -- errors in user code ------------------------------------------------------------------------

FAIL_AT_ID = 21  # in task 2 (ids 16-23), batch 21-23: tasks 0 and 1 complete before it


def forward_fails_at_21(batch: dict[str, Any]) -> Any:
    if bool((batch["id"] == FAIL_AT_ID).any()):
        raise UserError("forward failed on the batch of record 21")
    return batch["id"].float()


FAULT_STAGES = {
    "prepare_batch": lambda: (fn_raises(at=FAIL_AT_ID, fn=encode), ScoreModel(), attach_score),
    "forward": lambda: (encode, forward_fails_at_21, attach_score),
    "postprocess": lambda: (encode, ScoreModel(), fn_raises(at=FAIL_AT_ID, fn=attach_score)),
}


@pytest.mark.parametrize("counts", [(1, 1), (3, 2)], ids=counts_id)
@pytest.mark.parametrize("part", FAULT_STAGES)
def test_user_error_keeps_its_type_and_traceback(part, counts):
    stream = sp.from_iterable(make_records(60)).map_gpu(*FAULT_STAGES[part](), batch_size=3).set_processing(task_size=8)
    expected, simple_exc = collect_until_error(stream.set_processing(backend="simple"))
    outputs, exc = collect_until_error(stream.set_processing(**gpu_workers(*counts)))
    assert type(exc) is UserError and type(simple_exc) is UserError, exc
    assert len(expected) == 16  # tasks 0 and 1, in order, then the error
    assert_records_equal(outputs, expected)
    [note] = stage_notes(exc)
    assert note.startswith("streamproc: raised in stage 1 (map_gpu(") and note.endswith(f", {part}"), note
    assert isinstance(exc.__cause__, sp.RemoteTraceback)
    cause = str(exc.__cause__)
    notes = " ".join(exc.__notes__)
    if part == "forward":
        # Raised in a GPU worker, re-raised in the CPU worker that sent the batch: the
        # traceback shows the line of forward that raised.
        assert 'raise UserError("forward failed on the batch of record 21")' in cause
        assert "Traceback in gpu worker" in cause and "gpu worker" in notes
    else:
        assert "raise self.exc(" in cause  # the line of tests.utils' raising callable
        assert "gpu worker" not in notes + cause


# -- a GPU worker that dies ---------------------------------------------------------------------


def _die(how: str) -> None:
    if how == "os._exit":
        os._exit(7)
    elif how == "SIGKILL":  # the OOM killer's way
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "sys.exit(3)":
        sys.exit(3)
    elif how == "sys.exit(0)":
        sys.exit(0)
    elif how == "os._exit(0)":
        os._exit(0)


def forward_dies_at_21(batch: dict[str, Any], how: str) -> Any:
    if bool((batch["id"] == FAIL_AT_ID).any()):
        _die(how)
    return batch["id"].float()


CRASHES = {
    "os._exit": r"gpu worker 0 .*exit code 7",
    "SIGKILL": r"gpu worker 0 .*SIGKILL",
    "sys.exit(3)": r"gpu worker 0 .*(exit code 3|SystemExit\(3\))",
    # Exit status 0 is no crash for the main process (GPU workers exit 0 when done); the GPU
    # worker reports that forward stopped it.
    "sys.exit(0)": r"gpu worker 0 stopped: user code raised SystemExit\(0\) in forward",
    # Not even an exception: the CPU worker waiting for the batch finds the pipe closed.
    # Whichever notices first: the main process (its sentinel) or the CPU worker (its liveness pipe).
    "os._exit(0)": r"gpu worker 0 (\(pid \d+\) died unexpectedly during the run: exit code 0|stopped before answering)",
}


@pytest.mark.parametrize("cpu_workers", [1, 3])
@pytest.mark.parametrize("how", CRASHES)
def test_gpu_worker_death_raises_worker_crashed_error(how, cpu_workers):
    forward = functools.partial(forward_dies_at_21, how=how)
    stream = sp.from_iterable(make_records(200)).map_gpu(encode, forward, attach_score, batch_size=3)
    stream = stream.set_processing(task_size=8, **gpu_workers(cpu_workers, 1))
    start = time.monotonic()
    with pytest.raises(sp.WorkerCrashedError, match=CRASHES[how]):
        stream.to_list()
    assert time.monotonic() - start < CRASH_REPORT_TIMEOUT_S


def test_death_of_one_of_two_gpu_workers_is_reported():
    forward = functools.partial(forward_dies_at_21, how="SIGKILL")
    stream = sp.from_iterable(make_records(200)).map_gpu(encode, forward, attach_score, batch_size=3)
    with pytest.raises(sp.WorkerCrashedError, match=r"gpu worker [01] \(pid \d+\) died unexpectedly.*SIGKILL"):
        stream.set_processing(task_size=8, **gpu_workers(2, 2)).to_list()


# -- a GPU worker that cannot start ---------------------------------------------------------------


class FailsToMove(ScoreModel):
    """A model whose ``.to(device)`` (done once, when the GPU worker starts) raises."""

    def to(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise UserError("cannot move the model to its device")


class FailsToUnpickle(ScoreModel):
    """A model that cannot be unpickled (in the GPU worker: CPU workers never unpickle it)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise UserError("cannot unpickle the model")


class ExitsWhenUnpickled(ScoreModel):
    def __setstate__(self, state: dict[str, Any]) -> None:
        sys.exit(2)


@pytest.mark.parametrize("gpu", [1, 2])
def test_sys_exit_while_a_gpu_worker_starts_does_not_exit_the_main_process(gpu):
    stream = sp.from_iterable(make_records(40)).map_gpu(encode, ExitsWhenUnpickled(), attach_score, batch_size=4)
    with pytest.raises(sp.WorkerCrashedError, match=r"gpu worker [01] stopped: user code raised SystemExit\(2\) while starting"):
        stream.set_processing(task_size=8, **gpu_workers(2, gpu)).to_list()


@pytest.mark.parametrize("gpu", [1, 2])
@pytest.mark.parametrize(
    ("model", "line"),
    [(FailsToMove, 'raise UserError("cannot move the model'), (FailsToUnpickle, 'raise UserError("cannot unpickle')],
    ids=["to", "unpickle"],
)
def test_gpu_worker_start_up_error_names_the_gpu_worker(model, line, gpu):
    stream = sp.from_iterable(make_records(40)).map_gpu(encode, model(), attach_score, batch_size=4)
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        stream.set_processing(task_size=8, **gpu_workers(2, gpu)).to_list()
    assert time.monotonic() - start < CRASH_REPORT_TIMEOUT_S
    exc = info.value
    assert type(exc) is UserError
    assert any(
        note.startswith("streamproc: raised in gpu worker") and note.endswith("(cpu), at start-up") for note in exc.__notes__
    )
    assert line in str(exc.__cause__) and "Traceback in gpu worker" in str(exc.__cause__)


# -- model weights go to GPU workers only -------------------------------------------------------


def _record(directory: str, event: str) -> None:
    """Leaves an empty file named ``<event>-<pid>-<unique>`` in ``directory``."""
    Path(directory, f"{event}-{os.getpid()}-{uuid.uuid4().hex}").touch()


def _recorded(directory: Path, event: str) -> list[int]:
    """The pids that recorded ``event``, once per time they did."""
    return sorted(int(path.name.split("-")[-2]) for path in directory.glob(f"{event}-*"))


class RecordingModel(ScoreModel):
    """Records in ``record_dir`` every pickling, unpickling and forward call, with the pid."""

    def __init__(self, record_dir: str) -> None:
        super().__init__()
        self.record_dir = record_dir

    def __getstate__(self) -> dict[str, Any]:
        _record(self.record_dir, "pickled")
        return super().__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _record(self.record_dir, "unpickled")

    def forward(self, batch: dict[str, Any]) -> Any:
        _record(self.record_dir, "forward")
        return super().forward(batch)


class RecordingPrepare:
    """prepare_batch that records the pid, and whether CUDA is initialised in that process."""

    def __init__(self, record_dir: str) -> None:
        self.record_dir = record_dir

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        _record(self.record_dir, f"prepare_cuda={torch.cuda.is_initialized()}")
        return encode(records)


@pytest.mark.parametrize(("start_method", "counts"), [(None, (2, 2)), ("spawn", (1, 1))], ids=["default", "spawn"])
def test_model_weights_reach_gpu_workers_only(tmp_path, start_method, counts):
    stream = sp.from_iterable(make_records(48)).map_gpu(
        RecordingPrepare(str(tmp_path)), RecordingModel(str(tmp_path)), attach_score, batch_size=4
    )
    stream = stream.set_processing(task_size=8)
    expected = stream.set_processing(backend="simple").to_list()
    for path in tmp_path.iterdir():
        path.unlink()

    out = stream.set_processing(**gpu_workers(*counts, process_start_method=start_method)).to_list()
    assert_records_equal(out, expected)
    unpickled = _recorded(tmp_path, "unpickled")
    forward_pids, cpu_pids = set(_recorded(tmp_path, "forward")), set(_recorded(tmp_path, "prepare_cuda=False"))
    # Pickled once, in the main process, for all GPU workers; unpickled once in each GPU
    # worker (the processes that ran forward), never in a CPU worker.
    assert _recorded(tmp_path, "pickled") == [os.getpid()]
    assert len(set(unpickled)) == len(unpickled) == counts[1]
    assert forward_pids and forward_pids <= set(unpickled)
    assert cpu_pids and not cpu_pids & set(unpickled) and os.getpid() not in cpu_pids | set(unpickled)
    # CPU workers never touched CUDA (trivially true without a GPU; meaningful with one).
    assert not list(tmp_path.glob("prepare_cuda=True-*"))


# -- transport and shutdown -------------------------------------------------------------------


def big_batch(records: list[dict[str, Any]]) -> Any:
    """2 MiB per record: far more than a pipe's buffer (64 KiB) in flight, both ways."""
    return torch.full((len(records), 512 * 1024), float(records[0]["id"]))


def plus_one(batch: Any) -> Any:
    return batch + 1


def last_column(records: list[dict[str, Any]], outputs: Any) -> list[float]:
    return outputs[:, -1].tolist()


def test_batches_and_outputs_larger_than_a_pipe_buffer():
    stream = (
        sp.from_iterable(make_records(24)).map_gpu(big_batch, plus_one, last_column, batch_size=2).set_processing(task_size=4)
    )
    out = assert_same_as_simple(stream, **gpu_workers(2, 2))
    assert out == [float(i - i % 2 + 1) for i in range(24)]


def test_consumer_stopping_early_stops_every_worker():
    stream = score_stream(n=400).set_processing(**gpu_workers(2, 2))
    it = iter(stream)
    assert [next(it)["id"] for _ in range(5)] == list(range(5))
    it.close()  # the leak check (tests/conftest.py) then finds no process and no thread left


def test_gpu_workers_start_when_stderr_has_no_file_descriptor(capsys):
    # capsys replaces sys.stderr with an in-memory stream that forked workers inherit, as
    # Jupyter and IDEs do; faulthandler cannot write there.
    assert_same_as_simple(score_stream(n=20), **gpu_workers(1, 1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback for machines without CUDA")
def test_gpu_workers_without_cuda_run_on_the_cpu_with_a_warning():
    stream = score_stream(n=20).set_processing(backend="multiprocessing", num_cpu_workers=2, num_gpu_workers=1)
    with pytest.warns(UserWarning, match="no CUDA device is visible: the GPU workers run on the CPU") as record:
        out = stream.to_list()
    assert_records_equal(out, score_stream(n=20).set_processing(backend="simple").to_list())
    assert [w.filename for w in record] == [__file__]  # points at the sink's caller


# -- on a real GPU ------------------------------------------------------------------------------


class GPUFlags(torch.nn.Module):
    """A seeded MLP; also reports, per row, whether forward ran on CUDA and in float16."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
        with torch.no_grad():
            for param in self.net.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    def forward(self, batch: Any) -> dict[str, Any]:
        y = self.net(batch)
        return {"y": y, "cuda": torch.full((len(y),), y.is_cuda), "half": torch.full((len(y),), y.dtype == torch.float16)}


def random_features(records: list[int]) -> Any:
    generator = torch.Generator().manual_seed(records[0])
    return torch.randn((len(records), 16), generator=generator)


@pytest.mark.gpu
def test_one_gpu_worker_on_cuda_with_autocast_matches_the_simple_backend():
    stream = sp.from_iterable(range(512)).map_gpu(random_features, GPUFlags(), batch_size=32)
    stream = stream.set_processing(task_size=64, autocast=True, gpu_worker_devices=["cuda:0"])
    # Multiprocessing first: CUDA is then not yet initialised here, and CPU workers may fork.
    actual = stream.set_processing(backend="multiprocessing", num_cpu_workers=2, num_gpu_workers=1).to_list()
    expected = stream.set_processing(backend="simple").to_list()
    assert len(actual) == len(expected) == 512
    assert all(row["cuda"] and row["half"] for row in actual)
    np.testing.assert_allclose(np.stack([r["y"] for r in actual]), np.stack([r["y"] for r in expected]), rtol=1e-2, atol=1e-2)
