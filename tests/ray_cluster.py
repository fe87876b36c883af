"""The Ray test cluster: one per session, outside this process's tree (no test here).

Imports no Ray until a fixture or function runs: tests/conftest.py registers the fixture
``ray_session`` (once, for every module) in every env, Ray-free ones included.

``ray start --head`` starts the cluster's processes and exits, so they are not descendants
of pytest: the leak check of ``tests/conftest.py`` still sees every process a test leaves
behind, and Ray's own (GCS, raylet, idle workers) are not blamed on the test. The session
fixture connects this process as a driver (which starts no process), and at the end kills
exactly the processes of that cluster, found by its own temporary directory, never by name.

Actors a test leaves behind are checked through the GCS (``ray.util.list_named_actors``):
every actor streamproc starts is named ``streamproc-<run>-cpu-<i>`` / ``-gpu-<i>``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

#: 2 CPUs and 2 logical GPUs (GPU workers then run forward on "cpu"): the issue's test cluster.
CLUSTER_CPUS = 2
CLUSTER_GPUS = 2
OBJECT_STORE_BYTES = 150 * 10**6
#: How long ``ray start`` may take, and how long the cluster's processes get to die at the end.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
#: How long a test waits for the actors of a run to leave the cluster (shutdown waits already).
ACTORS_GONE_TIMEOUT_S = 15.0
POLL_S = 0.05

#: The environment of every Ray process the tests start: no usage stats, no token (a private test cluster).
RAY_TEST_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "RAY_AUTH_MODE": "disabled"}

def _ray_binary() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the cluster whose temporary directory is ``temp_dir``, and their descendants."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
                roots.append(proc)
        except psutil.Error:
            continue
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({child.pid: child for child in root.children(recursive=True)})
        except psutil.Error:
            continue
    return [p for pid, p in found.items() if pid != os.getpid()]


def kill_processes(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)


def streamproc_actors() -> list[str]:
    """Names of the live actors streamproc started (any namespace)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("streamproc-"))


def _poll_until_empty(names: Callable[[], list[str]]) -> list[str]:
    """Calls ``names`` until it is empty or ``ACTORS_GONE_TIMEOUT_S`` has passed; returns its last answer."""
    deadline = time.monotonic() + ACTORS_GONE_TIMEOUT_S
    left = names()
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = names()
    return left


def wait_until_no_streamproc_actor() -> list[str]:
    """Waits (deadline loop) until no streamproc actor is alive; returns those left (empty: none)."""
    return _poll_until_empty(streamproc_actors)


def wait_until_only_warm_actors() -> list[str]:
    """Waits (deadline loop) until every live streamproc actor is a warm one kept for the next run
    (``streamproc.backends.ray.actor_pool``); returns the others (empty: none)."""
    from streamproc.backends.ray.actor_pool import warm_actor_names

    def others() -> list[str]:
        return sorted(set(streamproc_actors()) - set(warm_actor_names()))

    return _poll_until_empty(others)


def assert_no_actor_kept() -> None:
    """After a run that did not complete: no warm actor kept, and no streamproc actor alive."""
    from streamproc.backends.ray.actor_pool import warm_actor_names

    assert warm_actor_names() == []
    assert wait_until_no_streamproc_actor() == []


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """A 2-CPU, 2-logical-GPU cluster started with ``ray start``; this process joined as a driver."""
    ray = pytest.importorskip("ray")
    os.environ.update(RAY_TEST_ENV)
    # Short: Ray's unix socket paths live under it (108 bytes at most).
    temp_dir = tempfile.mkdtemp(prefix="spray-", dir="/tmp")
    command = [
        _ray_binary(), "start", "--head", f"--num-cpus={CLUSTER_CPUS}", f"--num-gpus={CLUSTER_GPUS}",
        "--include-dashboard=false", f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={temp_dir}",
        "--port=0", "--disable-usage-stats",
    ]
    started = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S, env={**os.environ, **RAY_TEST_ENV})
    if started.returncode != 0:
        kill_processes(cluster_processes(temp_dir))
        pytest.fail(f"ray start failed ({started.returncode}): {started.stderr[-2000:]}")
    address = _address_of(temp_dir)
    try:
        ray.init(address=address, logging_level="warning", log_to_driver=False)
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()
        kill_processes(cluster_processes(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _address_of(temp_dir: str) -> str:
    """The GCS address of the cluster started under ``temp_dir`` (``ray start`` writes it there)."""
    with open(os.path.join(temp_dir, "ray_current_cluster")) as f:
        return f.read().strip()


def reconnect(address: str) -> None:
    """Joins the cluster at ``address`` again (after a test that used another one)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=address, logging_level="warning", log_to_driver=False)
