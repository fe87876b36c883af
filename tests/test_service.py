"""The local service (issue 11 items 2-5): ``streamproc serve/status/stop`` and ``sp.connect``.

One server for the module, started as a subprocess through the CLI (``python -m streamproc
serve ... --port <free port>``, detached: it is not a child of this process, so the autouse
leak check does not see it; its workers are found through psutil from its pid). Every stream
run on it is compared with the simple backend's output. The server-killed test has its own
server. Every blocking call runs under the hang guard; no sleep synchronises anything
(``wait_for_condition`` polls a condition with a deadline).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import streamproc as sp
from streamproc.errors import AuthenticationError, ServiceUnavailableError, WorkerCrashedError
from streamproc.service import protocol
from tests.hang_guard import run_guarded
from tests.utils import UserError, assert_same_as_simple, fn_raises, wait_for_condition

CLI_TIMEOUT_S = 120
RUN_TIMEOUT_S = 60
#: A server killed mid-run is noticed within the heartbeat timeout; workers exit within a few
#: parent checks (PARENT_CHECK_INTERVAL_S) after.
LOST_SERVER_S = protocol.HEARTBEAT_TIMEOUT_S + 5
WORKERS_GONE_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m streamproc *args`` (its own output captured), under the hang guard."""
    def call() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamproc", *args], env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
        )

    return run_guarded(call, CLI_TIMEOUT_S + 10, f"streamproc {' '.join(args)}")


class Server:
    """A server started with ``streamproc serve`` (detached), and what tests need to know of it."""

    def __init__(self, tmp: Path, cpu_workers: int = 2) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        done = cli("serve", "--cpu-workers", str(cpu_workers), "--port", str(self.port), env=self.env)
        assert done.returncode == 0, done.stderr
        assert f"ready at {self.address}" in done.stdout
        self.token_path = tmp / "streamproc" / f"{self.port}.token"
        self.token = self.token_path.read_text()
        self.pid = int(done.stdout.split(", pid ")[1].split(",")[0])

    def pool(self) -> Any:
        return run_guarded(lambda: sp.connect(self.address, token=self.token), RUN_TIMEOUT_S, "connect")

    def processes(self) -> list[psutil.Process]:
        """The server and every process under it (workers, forkserver, resource tracker)."""
        try:
            server = psutil.Process(self.pid)
            return [server, *server.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """Kills the server and its processes (teardown of a test that failed)."""
        for proc in self.processes():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("service")
    started = Server(tmp)
    try:
        yield started
    finally:
        if psutil.pid_exists(started.pid):
            cli("stop", "--port", str(started.port), env=started.env)
        started.kill()


def times_ten(x: int) -> int:
    return x * 10


def records(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "text": f"doc {i} " * (i % 5)} for i in range(n)]


def text_length(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "length": len(record["text"])}


def exit_at_seven(x: int) -> int:
    if x == 7:
        os._exit(1)
    return x


def status_of(server: Server) -> dict[str, Any]:
    done = cli("status", "--port", str(server.port), env=server.env)
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def same_as_simple(stream: sp.Stream, pool: Any) -> list[Any]:
    """``assert_same_as_simple(stream, pool=pool)`` under the hang guard."""
    return run_guarded(lambda: assert_same_as_simple(stream, pool=pool), RUN_TIMEOUT_S, f"{stream!r:.60} on the service")


def wait_idle(pool: Any) -> None:
    wait_for_condition(lambda: pool.status()["runs_active"] == 0, RUN_TIMEOUT_S, message="the server's runs ended")


# -- serving ------------------------------------------------------------------------------------
def test_two_concurrent_clients_get_fresh_run_outputs(server: Server, tmp_path: Path) -> None:
    # One client streams an in-memory iterable from here; the other's parquet file is read by
    # the server's workers (only row-group descriptors travel).
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(records(300)), path, row_group_size=40)
    pool = server.pool()
    workers_before = pool.status()["worker_pids"]
    streams = {
        "iterable": sp.from_iterable(range(500)).map(times_ten).set_processing(task_size=25),
        "parquet": sp.read_parquet(str(path)).map(text_length),
    }
    results: dict[str, list[Any]] = {}
    errors: list[BaseException] = []

    def client(name: str) -> None:
        try:
            results[name] = assert_same_as_simple(streams[name], pool=pool)
        except BaseException as exc:
            errors.append(exc)

    def both() -> None:
        threads = [threading.Thread(target=client, args=(name,)) for name in streams]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run_guarded(both, RUN_TIMEOUT_S * 2, "two clients at once")
    assert errors == []
    assert results["iterable"] == [x * 10 for x in range(500)]
    assert [r["id"] for r in results["parquet"]] == list(range(300))
    status = pool.status()
    assert status["worker_pids"] == workers_before  # warm: the same processes served both
    assert status["runs_done"] >= 2


def as_tensor(batch: list[int]) -> Any:
    import torch

    return torch.tensor([[float(x), 1.0] for x in batch])


def as_numbers(batch: list[int], outputs: Any) -> list[float]:
    return [float(v) for v in outputs[:, 0]]


def small_model() -> Any:
    import torch

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0]]))
        model.bias.fill_(1.0)
    return model


def test_status_prints_workers_devices_models_and_runs(server: Server) -> None:
    pool = server.pool()
    stream = sp.from_iterable(range(20)).map_gpu(as_tensor, small_model(), as_numbers, batch_size=8)
    assert same_as_simple(stream, pool) == [2.0 * x + 1.0 for x in range(20)]
    status = status_of(server)
    assert [(m["model"], m["parameters"]) for m in status["models"]] == [("Linear", 3)]
    assert status["address"] == server.address
    assert status["pid"] == server.pid
    assert status["cpu_workers"] == 2
    assert status["gpu_worker_devices"] == []
    assert sorted(status["worker_pids"]) == ["cpu worker 0", "cpu worker 1"]
    assert all(psutil.pid_exists(pid) for pid in status["worker_pids"].values())
    assert {"models", "runs_served", "runs_active"} <= set(status)


def test_a_second_serve_on_a_busy_port_fails_and_leaves_the_first_alone(server: Server) -> None:
    done = cli("serve", "--cpu-workers", "1", "--port", str(server.port), env=server.env)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{server.port}" in done.stderr
    assert server.token_path.read_text() == server.token
    assert status_of(server)["pid"] == server.pid


def test_default_token_file_is_0600(server: Server) -> None:
    assert server.token_path.stat().st_mode & 0o777 == 0o600
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = server.env["XDG_RUNTIME_DIR"]
    try:
        pool = run_guarded(lambda: sp.connect(server.address), RUN_TIMEOUT_S, "connect with token=None")
    finally:
        if old is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = old
    assert run_guarded(sp.from_iterable(range(5)).set_processing(pool=pool).to_list, RUN_TIMEOUT_S) == list(range(5))


def test_wrong_token_is_refused_and_the_next_client_served(server: Server) -> None:
    with pytest.raises(AuthenticationError, match=f"{server.address} refused the token"):
        run_guarded(lambda: sp.connect(server.address, token="0" * 64), RUN_TIMEOUT_S, "connect, wrong token")
    pool = server.pool()
    assert pool.status()["connections_refused"] >= 1
    same_as_simple(sp.from_iterable(range(40)).map(times_ten), pool)


class WritesAFileWhenUnpickled:
    """A pickle that, loaded, creates ``path``: proof that a peer's bytes were unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_nothing_is_unpickled_before_authentication(server: Server, tmp_path: Path) -> None:
    import multiprocessing.connection
    import pickle

    marker = tmp_path / "unpickled"
    refused = server.pool().status()["connections_refused"]

    def send_a_pickle_instead_of_the_answer() -> None:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=RUN_TIMEOUT_S)
        sock.setblocking(True)
        conn = multiprocessing.connection.Connection(sock.detach())
        try:
            conn.recv_bytes()  # the server's challenge
            conn.send_bytes(pickle.dumps(WritesAFileWhenUnpickled(marker)))
            with pytest.raises((EOFError, OSError)):
                conn.recv_bytes()  # the server's "failure", then the end
                conn.recv_bytes()
        finally:
            conn.close()

    run_guarded(send_a_pickle_instead_of_the_answer, RUN_TIMEOUT_S, "an unauthenticated pickle")
    pool = server.pool()
    wait_for_condition(lambda: pool.status()["connections_refused"] == refused + 1, RUN_TIMEOUT_S)
    assert not marker.exists()


def test_version_mismatch_is_refused_clearly(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = server.pool()
    real = protocol.local_versions()
    monkeypatch.setattr(protocol, "local_versions", lambda: {**real, "dill": "0.0.1"})
    expected = r"version mismatch with the server: dill \S+ on the server, 0\.0\.1 in the client"
    with pytest.raises(ServiceUnavailableError, match=expected):
        run_guarded(pool.status, RUN_TIMEOUT_S, "status, other dill")


def test_pool_options_are_refused_with_a_service_pool(server: Server) -> None:
    pool = server.pool()
    with pytest.raises(ValueError, match="num_cpu_workers belong"):
        sp.from_iterable(range(3)).set_processing(pool=pool, num_cpu_workers=2)
    with pytest.raises(ValueError, match="not backend='threads'"):
        sp.from_iterable(range(3)).set_processing(pool=pool, backend="threads")
    # backend="multiprocessing" is what the server runs: accepted.
    explicit = sp.from_iterable(range(6)).map(times_ten).set_processing(backend="multiprocessing", pool=pool)
    assert run_guarded(explicit.to_list, RUN_TIMEOUT_S, "backend= and a service pool") == [x * 10 for x in range(6)]


def test_lost_server_address_raises_service_unavailable() -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailableError, match=f"no streamproc service at {address}"):
        run_guarded(lambda: sp.connect(address, token="x"), RUN_TIMEOUT_S, "connect to nothing")


def test_write_parquet_and_take_on_the_service_match_the_simple_backend(server: Server, tmp_path: Path) -> None:
    pool = server.pool()
    stream = sp.from_iterable(records(120)).map(text_length).set_processing(task_size=10)
    paths = {}
    for name, options in (("simple", {"backend": "simple"}), ("service", {"pool": pool})):
        run = stream.set_processing(**options)
        write = functools.partial(run.write_parquet, str(tmp_path / name), rows_per_file=50)
        paths[name] = run_guarded(write, RUN_TIMEOUT_S, f"write_parquet, {name}")
    assert [Path(p).name for p in paths["service"]] == [Path(p).name for p in paths["simple"]]
    assert pq.read_table(tmp_path / "service").equals(pq.read_table(tmp_path / "simple"))
    # limit(): its inner run (the ops before it) shares the workers with the outer run.
    limited = sp.from_iterable(range(1000)).map(times_ten).limit(33).map(str).set_processing(pool=pool, task_size=10)
    assert run_guarded(limited.to_list, RUN_TIMEOUT_S, "limit(33) on the service") == [str(x * 10) for x in range(33)]
    # ... except with retries, which have the workers alone: refused, with the way out.
    retrying = sp.from_iterable(range(100)).map(times_ten).limit(5).set_processing(pool=pool, max_task_retries=1)
    with pytest.raises(ValueError, match=r"limit\(\) on a service pool with max_task_retries is not supported"):
        retrying.to_list()
    taken = sp.from_iterable(range(1000)).map(times_ten).set_processing(pool=pool, task_size=10)
    assert run_guarded(lambda: taken.take(33), RUN_TIMEOUT_S, "take(33) on the service") == [x * 10 for x in range(33)]


def test_run_stats_have_the_server_workers_and_explain_names_the_service(server: Server) -> None:
    pool = server.pool()
    stream = sp.from_iterable(range(100)).map(times_ten).set_processing(pool=pool, task_size=10)

    def collected() -> tuple[list[Any], Any]:
        with sp.collect_stats() as stats:  # a context variable: opened in the thread that runs
            return stream.to_list(), stats.runs

    outputs, runs = run_guarded(collected, RUN_TIMEOUT_S, "a run with stats")
    assert outputs == [x * 10 for x in range(100)]
    run = runs[0]
    assert run.records_out == 100 and run.tasks_done == 10
    assert len(run.workers("cpu")) >= 1
    assert "resolved by the 'service' backend" in stream.explain()


# -- faults ---------------------------------------------------------------------------------------
def test_user_error_comes_out_typed_and_the_server_survives(server: Server) -> None:
    pool = server.pool()
    stream = sp.from_iterable(range(30)).map(fn_raises(13)).set_processing(pool=pool, task_size=5)
    with pytest.raises(UserError) as caught:
        run_guarded(stream.to_list, RUN_TIMEOUT_S, "a failing stream on the service")
    assert type(caught.value) is UserError
    cause = str(caught.value.__cause__)
    assert "the streamproc service at" in cause and "cpu worker" in cause and "tests/utils.py" in cause
    same_as_simple(sp.from_iterable(range(30)).map(times_ten), pool)


def test_source_error_in_the_client_comes_out_typed(server: Server) -> None:
    def source() -> Iterator[int]:
        yield from range(12)
        raise UserError("the client's source broke")

    pool = server.pool()
    stream = sp.from_iterable(source()).map(times_ten).set_processing(pool=pool, task_size=4)
    with pytest.raises(UserError, match="the client's source broke"):
        run_guarded(stream.to_list, RUN_TIMEOUT_S, "a failing client source")
    same_as_simple(sp.from_iterable(range(8)).map(times_ten), pool)


def test_worker_crash_is_reported_and_the_worker_replaced(server: Server) -> None:
    pool = server.pool()
    before = pool.status()["worker_pids"]
    stream = sp.from_iterable(range(20)).map(exit_at_seven).set_processing(pool=pool, task_size=5)
    with pytest.raises(WorkerCrashedError):
        run_guarded(stream.to_list, RUN_TIMEOUT_S, "a crashing stream on the service")
    same_as_simple(sp.from_iterable(range(20)).map(times_ten), pool)
    after = pool.status()["worker_pids"]
    assert sorted(after) == sorted(before) and after != before  # one replaced, same count


def test_early_break_cancels_the_run_on_the_server(server: Server) -> None:
    pool = server.pool()
    cancelled = pool.status()["runs_cancelled"]
    stream = sp.from_iterable(range(10_000)).map(times_ten).set_processing(pool=pool, task_size=10)

    def first_five() -> list[int]:
        taken = []
        for record in stream:
            taken.append(record)
            if len(taken) == 5:
                break
        return taken

    assert run_guarded(first_five, RUN_TIMEOUT_S, "an early break") == [0, 10, 20, 30, 40]
    run_guarded(lambda: wait_idle(pool), RUN_TIMEOUT_S + 5, "the cancelled run's end")
    assert pool.status()["runs_cancelled"] == cancelled + 1
    same_as_simple(sp.from_iterable(range(50)).map(times_ten), pool)


CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys
    import streamproc as sp

    pool = sp.connect(sys.argv[1], token=sys.argv[2])

    def source():
        yield from range(10)
        sys.stdin.readline()  # blocks: the test kills this process here
        yield from range(10, 20)

    records = iter(sp.from_iterable(source()).set_processing(pool=pool, task_size=5))
    next(records)
    print("started", flush=True)
    list(records)
    """
)


def test_client_killed_mid_run_frees_the_workers(server: Server, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    pool = server.pool()
    cancelled = pool.status()["runs_cancelled"]
    client = subprocess.Popen(
        [sys.executable, str(script), server.address, server.token], env=server.env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert client.stdout is not None
        assert run_guarded(client.stdout.readline, RUN_TIMEOUT_S, "the client's first record") == "started\n"
        assert pool.status()["runs_active"] == 1
    finally:
        client.kill()
        client.wait(RUN_TIMEOUT_S)
        if client.stdin is not None:
            client.stdin.close()
        if client.stdout is not None:
            client.stdout.close()
    run_guarded(lambda: wait_idle(pool), RUN_TIMEOUT_S + 5, "the dead client's run to end")
    assert pool.status()["runs_cancelled"] == cancelled + 1
    same_as_simple(sp.from_iterable(range(30)).map(times_ten), pool)


def test_server_killed_mid_run_raises_in_the_client_and_leaves_no_worker(tmp_path: Path) -> None:
    own = Server(tmp_path, cpu_workers=2)
    release = threading.Event()
    try:
        processes = own.processes()
        assert len(processes) >= 3  # the server, its 2 workers (and multiprocessing's servers)
        pool = own.pool()

        def source() -> Iterator[int]:
            yield from range(10)
            release.wait(RUN_TIMEOUT_S)  # the run stays open until the server is gone
            yield from range(10, 20)

        def run_until_lost() -> list[int]:
            seen = []
            with pytest.raises(ServiceUnavailableError, match=f"service at {own.address}"):
                for record in sp.from_iterable(source()).set_processing(pool=pool, task_size=5):
                    seen.append(record)
                    if len(seen) == 1:
                        os.kill(own.pid, signal.SIGKILL)
            return seen

        seen = run_guarded(run_until_lost, LOST_SERVER_S + 10, "a client whose server is killed")
        assert seen[:1] == [0]
    finally:
        release.set()
        _gone, alive = psutil.wait_procs(processes, timeout=WORKERS_GONE_S)
        own.kill()
    assert alive == [], f"left after the server was killed: {alive}"


def test_stop_lets_the_active_run_finish_then_leaves_nothing(server: Server) -> None:
    # Last of the module: it stops the module's server.
    pool = server.pool()
    processes = server.processes()
    release = threading.Event()
    outputs: list[list[int]] = []

    def source() -> Iterator[int]:
        yield from range(10)
        release.wait(RUN_TIMEOUT_S)
        yield from range(10, 20)

    def client() -> None:
        outputs.append(sp.from_iterable(source()).map(times_ten).set_processing(pool=pool, task_size=5).to_list())

    runner = threading.Thread(target=client)
    runner.start()
    try:
        run_guarded(lambda: wait_for_condition(lambda: pool.status()["runs_active"] == 1, RUN_TIMEOUT_S),
                    RUN_TIMEOUT_S + 5, "the run to start")
        def stop() -> None:
            outputs.append([cli("stop", "--port", str(server.port), env=server.env).returncode])

        stopper = threading.Thread(target=stop)
        stopper.start()
        # Stopping: new connections are refused, the run goes on.
        run_guarded(lambda: wait_for_condition(_refuses(server), RUN_TIMEOUT_S), RUN_TIMEOUT_S + 5, "the stop to begin")
    finally:
        release.set()
        run_guarded(runner.join, RUN_TIMEOUT_S, "the run to finish")
    run_guarded(stopper.join, CLI_TIMEOUT_S + 10, "streamproc stop")
    assert sorted(outputs, key=len) == [[0], [x * 10 for x in range(20)]]  # stop's exit status 0, the whole run
    _gone, alive = psutil.wait_procs(processes, timeout=WORKERS_GONE_S)
    assert alive == []
    assert not server.token_path.exists()


def _refuses(server: Server) -> Any:
    def refuses() -> bool:
        try:
            sp.connect(server.address, token=server.token)
        except ServiceUnavailableError:
            return True
        return False

    return refuses
