"""Worker ``logging`` records reach the main process's handlers, tagged with the worker."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import pytest

import streamproc as sp
from streamproc.backends.multiprocessing import log_forwarding, run
from streamproc.backends.multiprocessing.messages import LogRecordMessage
from tests.hang_guard import run_guarded
from tests.utils import assert_same_as_simple

GUARD_TIMEOUT_S = 120
LOGGER = "tests.worker_logging"
METHODS = ["fork", "spawn"]


def log_and_double(x: int) -> int:
    """An op that logs at INFO and DEBUG (runs in the worker)."""
    logger = logging.getLogger(LOGGER)
    logger.info("record %d", x)
    logger.debug("debug %d", x)
    return 2 * x


def warn_on_three(x: int) -> int:
    logger = logging.getLogger(LOGGER)
    logger.info("info %d", x)
    if x == 3:
        logger.warning("three seen")
    return x


def log_an_exception(x: int) -> int:
    if x == 1:
        try:
            raise ValueError("bad value 1")
        except ValueError:
            logging.getLogger(LOGGER).exception("caught for record %d", x)
    return x


def log_unpicklable(x: int) -> int:
    logging.getLogger(LOGGER).info("holding %s", "lock", extra={"resource": threading.Lock()})
    return x


def log_from_a_thread(x: int) -> int:
    """Logs from a second thread of the worker while its main thread sends results."""
    if x == 0:
        thread = threading.Thread(target=lambda: [logging.getLogger(LOGGER).info("side %d", i) for i in range(50)])
        thread.start()
        thread.join(30)
    return x


def worker_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def mp(method: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "multiprocessing", "num_cpu_workers": 2, "process_start_method": method, **extra}


def run_list(stream: sp.Stream) -> list[Any]:
    return run_guarded(stream.to_list, GUARD_TIMEOUT_S, "a run that logs in its workers")


@pytest.mark.parametrize("method", METHODS)
def test_cpu_worker_records_reach_caplog_tagged(caplog, method):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stream = sp.from_iterable(list(range(12))).map(log_and_double).set_processing(task_size=3, **mp(method))
    assert run_list(stream) == [2 * i for i in range(12)]
    records = worker_records(caplog)
    assert sorted(r.getMessage().split("] ")[1] for r in records) == sorted(f"record {i}" for i in range(12))
    for record in records:
        assert record.worker in ("cpu worker 0", "cpu worker 1")
        assert record.getMessage().startswith(f"[{record.worker}] ")
        assert record.levelno == logging.INFO
        assert record.process != os.getpid()  # logged in the worker process, handled here
    assert not [r for r in records if "debug" in r.getMessage()]


@pytest.mark.parametrize("method", METHODS)
def test_only_records_at_the_main_process_level_are_sent(caplog, monkeypatch, method):
    """The root level (WARNING here) reaches the workers: INFO records are not even sent."""
    caplog.set_level(logging.WARNING)
    arrived: list[LogRecordMessage] = []

    def recording_reemit(message: LogRecordMessage) -> None:
        arrived.append(message)
        log_forwarding.reemit(message)

    monkeypatch.setattr(run, "reemit", recording_reemit)
    stream = sp.from_iterable(list(range(8))).map(warn_on_three).set_processing(task_size=2, **mp(method))
    assert run_list(stream) == list(range(8))
    assert [m.record["msg"].split("] ")[1] for m in arrived] == ["three seen"]
    [record] = worker_records(caplog)
    assert record.levelno == logging.WARNING and record.worker.startswith("cpu worker ")


@pytest.mark.parametrize("method", METHODS)
def test_root_level_set_in_the_main_process_reaches_spawned_workers(caplog, method):
    caplog.set_level(logging.INFO)  # the root logger, not LOGGER: the worker's LOGGER inherits it
    stream = sp.from_iterable(list(range(4))).map(warn_on_three).set_processing(task_size=2, **mp(method))
    assert run_list(stream) == list(range(4))
    assert sorted(r.getMessage().split("] ")[1] for r in worker_records(caplog)) == sorted(
        ["info 0", "info 1", "info 2", "info 3", "three seen"]
    )


@pytest.mark.parametrize("method", METHODS)
def test_exception_tracebacks_travel_as_text(caplog, method):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stream = sp.from_iterable(list(range(3))).map(log_an_exception).set_processing(task_size=1, **mp(method))
    assert run_list(stream) == [0, 1, 2]
    [record] = worker_records(caplog)
    assert record.levelno == logging.ERROR
    assert record.exc_info is None and "ValueError: bad value 1" in record.exc_text
    assert "in log_an_exception" in record.exc_text  # the worker's frame
    assert "ValueError: bad value 1" in logging.Formatter().format(record)


def test_unpicklable_extra_becomes_its_repr(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stream = sp.from_iterable([1]).map(log_unpicklable).set_processing(**mp("fork", num_cpu_workers=1))
    assert run_list(stream) == [1]
    [record] = worker_records(caplog)
    assert record.getMessage() == "[cpu worker 0] holding lock"
    assert "lock" in record.resource and isinstance(record.resource, str)


def test_records_from_another_worker_thread_do_not_corrupt_results(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stream = sp.from_iterable(list(range(2000))).map(log_from_a_thread).set_processing(task_size=50, **mp("fork"))
    assert run_list(stream) == list(range(2000))
    records = worker_records(caplog)
    assert sorted(r.getMessage().split("] ")[1] for r in records) == sorted(f"side {i}" for i in range(50))
    assert len({r.worker for r in records}) == 1


def stack(records: list[int]) -> Any:
    import torch

    return torch.tensor(records, dtype=torch.float32)


def logging_forward(batch: Any) -> Any:
    logging.getLogger(LOGGER).info("forward on %d rows", len(batch))
    return batch * 2


def to_ints(records: list[int], outputs: Any) -> list[int]:
    return [int(v) for v in outputs.tolist()]


@pytest.mark.filterwarnings("ignore:process_start_method='fork'")  # the forward runs single-threaded
@pytest.mark.parametrize("method", METHODS)
def test_gpu_worker_records_reach_caplog_tagged(caplog, method):
    pytest.importorskip("torch")
    caplog.set_level(logging.INFO, logger=LOGGER)
    stream = (
        sp.from_iterable(list(range(10)))
        .map_gpu(stack, logging_forward, to_ints, batch_size=5)
        .set_processing(task_size=5, **mp(method, num_gpu_workers=1, gpu_worker_devices=["cpu"]))
    )
    assert run_list(stream) == [2 * i for i in range(10)]
    records = worker_records(caplog)
    assert [r.getMessage() for r in records] == ["[gpu worker 0] forward on 5 rows"] * 2
    assert all(r.worker == "gpu worker 0" for r in records)


@pytest.mark.parametrize("num_threads", [1, 3])
def test_thread_worker_records_are_tagged(caplog, num_threads):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stream = sp.from_iterable(list(range(9))).map(log_and_double).set_processing(task_size=3)
    result = run_guarded(
        lambda: assert_same_as_simple(stream, backend="threads", num_cpu_workers=num_threads),
        GUARD_TIMEOUT_S,
        "threads run",
    )
    assert result == [2 * i for i in range(9)]
    tagged = [r for r in worker_records(caplog) if hasattr(r, "worker")]
    untagged = [r for r in worker_records(caplog) if not hasattr(r, "worker")]
    assert len(untagged) == 9  # the simple backend's run: the main thread logs untagged
    assert sorted(r.getMessage().split("] ")[1] for r in tagged) == sorted(f"record {i}" for i in range(9))
    assert {r.worker for r in tagged} <= {f"thread worker {i}" for i in range(num_threads)}
    assert all(r.getMessage().startswith(f"[{r.worker}] ") for r in tagged)


def test_main_thread_records_stay_untagged_after_a_threads_run(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    stream = sp.from_iterable([1]).map(log_and_double).set_processing(backend="threads", num_cpu_workers=1)
    assert run_guarded(stream.to_list, GUARD_TIMEOUT_S, "threads run") == [2]
    logging.getLogger(LOGGER).info("main %d", 5)
    assert worker_records(caplog)[-1].getMessage() == "main 5"


def test_portable_record_without_exception_keeps_its_fields():
    record = logging.LogRecord("x", logging.WARNING, "f.py", 7, "a %s b", ("z",), None)
    record.custom = 3
    data = log_forwarding.portable_record(record, "cpu worker 2")
    rebuilt = logging.makeLogRecord(data)
    assert rebuilt.getMessage() == "[cpu worker 2] a z b"
    assert (rebuilt.lineno, rebuilt.levelno, rebuilt.custom, rebuilt.worker) == (7, logging.WARNING, 3, "cpu worker 2")


def test_levels_round_trip():
    logging.getLogger("tests.worker_logging.levels").setLevel(logging.ERROR)
    try:
        levels = log_forwarding.capture_log_levels()
        assert ("tests.worker_logging.levels", logging.ERROR) in levels
        assert levels[0] == ("", logging.getLogger().level)
    finally:
        logging.getLogger("tests.worker_logging.levels").setLevel(logging.NOTSET)
