"""stream.explain(): the plan as text, resolved as the backend would, without running anything."""

from __future__ import annotations

import threading

import pytest

import streamproc as sp
from streamproc.backends.multiprocessing import cpu_budget
from streamproc.backends.multiprocessing.backend import pool_for
from streamproc.execution.schedule import get_dispatch_schedule
from tests.hang_guard import worker_processes
from tests.utils import CountingSource, double, identity


def collate(records: list[int]) -> list[int]:
    return records


def forward(batch: list[int]) -> list[int]:
    return batch


def one_per_record(records: list[int], outputs: list[int]) -> list[int]:
    return outputs


def gpu_stream() -> sp.Stream:
    return (
        sp.from_iterable(list(range(100)))
        .map(double)
        .map_gpu(collate, forward, one_per_record, batch_size="64 tokens", batch_by=len)
    )


def test_simple_backend_text():
    stream = sp.from_iterable(range(10)).map(double).map_batches(identity, batch_size=4).set_processing(task_size=5)
    assert stream.explain().splitlines() == [
        "streamproc plan: backend 'simple', deterministic=True",
        "source   from_iterable(range(0, 10)): 10 records",
        "         tasks of up to 5 records, pulled from the iterable in the main process",
        "tasks    task_size=5 records (a batch never spans two tasks)",
        "stages",
        "  1  map(double)                                   main process",
        "  2  map_batches(identity)                         main process; batches of 4 records",
        "sink     main process, in task order",
        "workers  none: every task runs in the calling thread, in order",
    ]


def test_simple_backend_forward_runs_in_the_main_process_on_its_device():
    text = gpu_stream().set_processing(gpu_worker_devices=["cpu"], backend="simple").explain()
    assert "  2  map_gpu(collate, forward, one_per_record)     batches of 64 tokens, batch_by=len" in text
    assert "       prepare_batch = collate                     main process" in text
    assert "       forward                                     main process, on cpu" in text
    assert "       postprocess = one_per_record                main process" in text


def test_multiprocessing_without_gpu_workers(monkeypatch):
    monkeypatch.setattr(cpu_budget, "cpu_count", lambda: 6)
    stream = sp.from_iterable(list(range(10))).map(double).set_processing(backend="multiprocessing")
    text = stream.explain()
    method = pool_for(stream.plan()).cpu_start_method
    assert f"workers  6 CPU worker process(es) (start method {method!r}, default: cpu_count()=6" in text
    assert "  1  map(double)                                   CPU worker" in text
    assert "pulled from the iterable in the main process" in text
    assert "dispatch" not in text
    assert "GPU worker" not in text


def test_multiprocessing_with_a_map_gpu_stage_but_no_gpu_worker():
    text = gpu_stream().set_processing(backend="multiprocessing", num_cpu_workers=2, num_gpu_workers=0).explain()
    assert "       forward                                     CPU worker, on cpu (no GPU worker)" in text
    assert "2 CPU worker process(es)" in text


@pytest.mark.parametrize("num_cpu, num_gpu", [(3, 2), (4, 2), (2, 3), (5, 1)])
def test_multiprocessing_with_gpu_workers_shows_devices_and_dispatch_cycles(num_cpu, num_gpu):
    stream = gpu_stream().set_processing(
        backend="multiprocessing", num_cpu_workers=num_cpu, num_gpu_workers=num_gpu, gpu_worker_devices=["cpu"],
        process_start_method="spawn",
    )
    lines = stream.explain().splitlines()
    assert f"workers  {num_cpu} CPU worker process(es) (start method 'spawn')" in lines
    assert f"         {num_gpu} GPU worker process(es) (start method 'spawn'):" in lines
    assert [line.strip() for line in lines if line.strip().startswith("gpu worker ")] == [
        f"gpu worker {i} on cpu" for i in range(num_gpu)
    ]
    assert "       forward                                     GPU worker, on cpu" in lines
    dispatch = lines[lines.index("dispatch each CPU worker's cycle of GPU workers (get_dispatch_schedule):") + 1 :]
    assert dispatch == [
        f"  cpu worker {cpu} -> " + ", ".join(f"gpu worker {g}" for g in get_dispatch_schedule(cpu, num_cpu, num_gpu))
        for cpu in range(num_cpu)
    ]


def test_default_cpu_workers_leave_a_cpu_per_gpu_worker(monkeypatch):
    monkeypatch.setattr(cpu_budget, "cpu_count", lambda: 8)
    stream = gpu_stream().set_processing(backend="multiprocessing", num_gpu_workers=2, gpu_worker_devices=["cpu"])
    text = stream.explain()
    assert "workers  6 CPU worker process(es)" in text
    assert "cpu_count()=8 less one per GPU worker" in text
    assert text.count("  cpu worker ") == 6


def test_threads_backend_and_unordered_sink():
    text = sp.from_iterable([1]).map(double).set_processing(backend="threads", num_cpu_workers=2, deterministic=False).explain()
    assert "  1  map(double)                                   worker thread" in text
    assert "workers  2 worker thread(s) in the main process (streamproc-thread-0..1)" in text
    assert "sink     main process, in completion order" in text


def test_unordered_multiprocessing_writes_parquet_in_workers():
    stream = sp.from_iterable([1]).set_processing(backend="multiprocessing", num_cpu_workers=2, deterministic=False)
    text = stream.explain()
    assert "(write_parquet writes its part files in the CPU workers)" in text


def test_sources_describe_their_tasks(tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(30))}), tmp_path / "a.parquet", row_group_size=10)
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n')
    options = {"backend": "multiprocessing", "num_cpu_workers": 2}
    parquet = sp.read_parquet(tmp_path / "a.parquet").set_processing(**options).explain()
    assert ": 30 records" in parquet
    assert "one task per row group, listed in the main process, decoded in the CPU worker" in parquet
    jsonl = sp.read_jsonl(tmp_path / "a.jsonl").set_processing(**options).explain()
    assert ": size unknown" in jsonl and "parsed in the CPU worker" in jsonl
    pandas = sp.from_pandas(pd.DataFrame({"a": range(7)})).set_processing(**options).explain()
    assert ": 7 records" in pandas and "row ranges of 1024" in pandas


def test_explain_starts_nothing_and_reads_nothing():
    source = CountingSource(range(1000))
    stream = (
        sp.from_iterable(source)
        .map(double)
        .map_gpu(collate, forward, batch_size=8)
        .set_processing(backend="multiprocessing", num_cpu_workers=3, num_gpu_workers=2, gpu_worker_devices=["cpu"])
    )
    threads_before = set(threading.enumerate())
    processes_before = {p.pid for p in worker_processes()}
    text = stream.explain()
    assert "postprocess (default: one row per record)" in text
    assert source.pulled == 0 and source.iterations == 0
    assert {p.pid for p in worker_processes()} == processes_before
    assert set(threading.enumerate()) == threads_before


def test_a_device_the_machine_lacks_fails_as_the_run_would():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    stream = gpu_stream().set_processing(backend="multiprocessing", num_cpu_workers=1, gpu_worker_devices=["cuda:0"])
    with pytest.raises(ValueError, match="gpu_worker_devices") as explained:
        stream.explain()
    with pytest.raises(ValueError) as ran:
        stream.to_list()
    assert str(explained.value) == str(ran.value)


def test_limit_runs_an_inner_stream_in_the_main_process():
    stream = sp.from_iterable(list(range(100))).map(double).limit(10).map(identity)
    text = stream.explain()
    assert "source   from_iterable(<list>).map(double).limit(10): 10 records" in text
    assert "the first 10 records of an inner run (backend 'simple') of the ops before limit(), in the main process" in text
    assert "  1  map(identity)" in text
