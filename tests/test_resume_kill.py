"""A write_parquet job killed (SIGKILL of its process tree, or SIGTERM) and resumed ends with the
uninterrupted run's directory: same part files, same rows, same order, same row groups.

The job runs in its own process (``tests/resume_job.py``, its own session so that its whole
tree can be killed, as a power loss would). The kill point is chosen from a seed: the record
at which the job blocks (it announces it with a file) and how many part commits the test waits
to see in the manifest first. Nothing synchronises on time: the test polls files with a deadline.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.hang_guard import run_guarded
from tests.parquet_dirs import manifest_parts, snapshot
from tests.resume_job import LAYOUT, N, build_stream
from tests.utils import wait_for_condition

REPO = Path(__file__).resolve().parent.parent
CONFIGS: list[dict[str, Any]] = [
    {"backend": "simple"},
    {"backend": "multiprocessing", "num_cpu_workers": 2},
    {"backend": "multiprocessing", "num_cpu_workers": 3, "deterministic": False},
    {"backend": "threads", "num_cpu_workers": 2},
]
RECORDS_PER_PART = 20
JOB_TIMEOUT_S = 120
#: How long the test waits for the job to reach its kill point (process start and imports included).
KILL_POINT_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("reference") / "out"
    run_guarded(lambda: build_stream({}).write_parquet(out, **LAYOUT), 60, "the reference write")
    return snapshot(out)


def _start_job(out: Path, config: dict[str, Any], gate: int, resume: bool) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.resume_job", str(out), json.dumps(config), str(gate), "1" if resume else "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def _kill_tree(job: subprocess.Popen[str]) -> None:
    try:
        os.killpg(job.pid, signal.SIGKILL)  # the main process and its workers, at once
    except ProcessLookupError:  # the job had ended (and its workers with it)
        pass


def _finish(job: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = job.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(job)
        _, err = job.communicate()
        pytest.fail(f"deadlock: the job did not end within {JOB_TIMEOUT_S} s: {err[-3000:]}")
    return job.returncode, err


def _kill_point(seed: int) -> tuple[dict[str, Any], int, int]:
    """``(config, gate record, parts to see committed first)`` of seed ``seed``."""
    rng = random.Random(seed)
    config = CONFIGS[seed % len(CONFIGS)]
    gate = rng.randrange(N)
    # Parts before the gate's commit whatever the backend (they precede it in task order;
    # workers writing parts finish the others meanwhile): wait for some of them.
    return config, gate, rng.randint(0, gate // RECORDS_PER_PART)


def _wait_for_kill_point(job: subprocess.Popen[str], out: Path, gate: int, commits: int) -> None:
    def ready() -> bool:
        if job.poll() is not None:
            raise AssertionError(f"the job ended before its kill point: {job.communicate()[1][-3000:]}")
        return os.path.exists(f"{out}.gate") and len(manifest_parts(out)) >= commits

    wait_for_condition(ready, timeout_s=KILL_POINT_TIMEOUT_S, message=f"record {gate} reached, {commits} parts committed")


def _resume_and_check(out: Path, config: dict[str, Any], reference: dict[str, Any]) -> None:
    code, err = _finish(_start_job(out, config, gate=-1, resume=True))
    assert code == 0, err[-3000:]
    assert snapshot(out) == reference


@pytest.mark.parametrize("seed", range(8))
def test_sigkill_of_the_process_tree_then_resume(tmp_path, reference, seed):
    config, gate, commits = _kill_point(seed)
    out = tmp_path / "out"
    job = _start_job(out, config, gate, resume=False)
    try:
        _wait_for_kill_point(job, out, gate, commits)
    finally:
        _kill_tree(job)
        _finish(job)
    assert job.returncode == -signal.SIGKILL
    committed = [p["group"] for p in manifest_parts(out)]
    assert gate // RECORDS_PER_PART not in committed
    assert len(committed) >= commits
    _resume_and_check(out, config, reference)


@pytest.mark.parametrize("seed", range(2))
def test_sigkill_while_running_freely_then_resume(tmp_path, reference, seed):
    # No gate: killed as soon as the manifest shows k commits (the job may be anywhere after).
    config, _, _ = _kill_point(seed + 100)
    commits = random.Random(seed).randint(1, N // RECORDS_PER_PART - 1)
    out = tmp_path / "out"
    job = _start_job(out, config, gate=-1, resume=False)
    try:
        wait_for_condition(
            lambda: job.poll() is not None or len(manifest_parts(out)) >= commits, timeout_s=KILL_POINT_TIMEOUT_S
        )
    finally:
        _kill_tree(job)
        _finish(job)
    _resume_and_check(out, config, reference)


@pytest.mark.parametrize("config", CONFIGS[:3], ids=["simple", "multiprocessing", "workers-write"])
def test_sigterm_commits_exits_143_then_resume(tmp_path, reference, config):
    gate = 130
    out = tmp_path / "out"
    job = _start_job(out, config, gate, resume=False)
    try:
        _wait_for_kill_point(job, out, gate, commits=3)
        os.kill(job.pid, signal.SIGTERM)  # the main process only, as a scheduler's first signal
        code, err = _finish(job)
    finally:
        if job.poll() is None:
            _kill_tree(job)
            _finish(job)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM stopped write_parquet" in err and "resume=True" in err
    assert "Traceback" not in err
    names = os.listdir(out)
    assert not [n for n in names if n.endswith(".inprogress")]
    committed = manifest_parts(out)
    assert len(committed) >= 3 and gate // RECORDS_PER_PART not in [p["group"] for p in committed]
    on_disk, listed = {n for n in names if n.startswith("part-")}, {p["file"] for p in committed if p["file"]}
    if config.get("deterministic", True):
        assert on_disk == listed  # the main process writes: what is complete is committed
    else:
        # Workers may have completed parts whose entry had not reached the main process:
        # not in the manifest, so not committed; resume writes them again.
        assert listed <= on_disk
    _resume_and_check(out, config, reference)


# -- the SIGTERM handler itself (in this process's main thread) ------------------------------------


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    signal.sigtimedwait([], 0)  # a syscall: the handler runs here at the latest
    raise AssertionError("SIGTERM did not stop the run")


def test_sigterm_with_the_default_handler_exits_143_and_restores_it(recwarn):
    from streamproc.io.termination import RunTerminated, run_until_sigterm

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit) as info:
            run_until_sigterm(_sigterm_self, "the test run")
        assert info.value.code == 128 + signal.SIGTERM
        assert isinstance(info.value.__cause__, RunTerminated)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert "SIGTERM stopped the test run" in str(recwarn.pop(RuntimeWarning).message)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_calls_a_python_handler_after_the_abort_and_restores_it(recwarn):
    from streamproc.io.termination import RunTerminated, run_until_sigterm

    calls: list[int] = []

    def mine(signum: int, frame: Any) -> None:
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(RunTerminated):
            run_until_sigterm(_sigterm_self, "the test run")
        assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is mine
        # Another exception, without SIGTERM, goes through as is.
        with pytest.raises(ZeroDivisionError):
            run_until_sigterm(lambda: 1 // 0, "the test run")
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
