"""The GPU worker's intake thread (``backends/multiprocessing/gpu_intake.py``), in this process.

What the GPU worker needs of it: requests are read and their batches uploaded by the intake
thread while the main thread is busy computing (it does not call ``next_batch``), in the order
each peer sent them; control messages that change the runners run in the main thread, before
the batches sent after them are uploaded; a request that fails to upload is answered with
``ForwardFailed`` without stopping the intake; a peer that dies is marked lost; an error in
the intake thread is raised in the main thread. Real pipes, fake runners and senders.
"""

from __future__ import annotations

import queue
import threading
from multiprocessing import Pipe
from typing import Any

import pytest

from streamproc.backends.multiprocessing.gpu_intake import BatchIntake
from streamproc.backends.multiprocessing.messages import (
    EndGPURun,
    ForwardFailed,
    ForwardRequest,
    NoMoreBatches,
    StartGPURun,
    WorkerId,
)
from streamproc.execution.serialization import dumps_message
from tests.hang_guard import run_guarded

TIMEOUT_S = 30
INTAKE_THREAD = "streamproc-gpu-0-intake"


class FakeRunner:
    """Uploads by returning the batch; records the thread that uploaded it."""

    def __init__(self, stage: str = "stage 1", fail_on: Any = None) -> None:
        self.stage = stage
        self.fail_on = fail_on
        self.upload_threads: list[str] = []

    def upload(self, batch: Any) -> Any:
        self.upload_threads.append(threading.current_thread().name)
        if batch == self.fail_on:
            raise ValueError(f"cannot upload {batch!r}")
        return batch


class FakeSender:
    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def close(self, timeout: float) -> None:
        pass


class Peer:
    """One CPU peer's pipes: its batch pipe and its liveness pipe (test side: the write ends)."""

    def __init__(self) -> None:
        self.batches, self.batch_writer = Pipe(duplex=False)
        self.alive, self.alive_writer = Pipe(duplex=False)
        self.sender = FakeSender()

    def send(self, message: Any) -> None:
        self.batch_writer.send_bytes(dumps_message(message))

    def die(self) -> None:
        self.batch_writer.close()
        self.alive_writer.close()


def make_intake(peers: list[Peer], runners: dict[Any, Any], control: Any = None, on_control: Any = None) -> BatchIntake:
    return BatchIntake(
        WorkerId("gpu", 0),
        "gpu worker 0 (cpu)",
        {peer.batches: peer.sender for peer in peers},
        {peer.alive: peer.batches for peer in peers},
        {peer.batches: index for index, peer in enumerate(peers)},
        runners,
        control,
        on_control or (lambda message: None),
        lambda index, writer: FakeSender(),  # type: ignore[arg-type, return-value]
    )


def wait_uploaded(intake: BatchIntake, count: int) -> None:
    with intake.cond:
        assert intake.cond.wait_for(lambda: len(intake.uploaded) >= count, TIMEOUT_S), list(intake.uploaded)


def run_next(intake: BatchIntake) -> tuple[Any, float]:
    """The next batch, oldest first, as the GPU worker's main thread takes it (and the seconds waited)."""
    return intake.next_batch(lambda uploaded: uploaded.popleft())


def drain(intake: BatchIntake) -> list[Any]:
    """Takes every batch, oldest first, until the intake ends (as the GPU worker's main thread does)."""
    taken = []
    while True:
        entry, _ = run_next(intake)
        if entry is None:
            return taken
        taken.append(entry[2])


def test_batches_are_read_and_uploaded_while_the_main_thread_computes() -> None:
    def scenario() -> None:
        peers = [Peer(), Peer()]
        runner = FakeRunner()
        intake = make_intake(peers, {(None, 1): runner})
        intake.start()
        for i in range(3):
            peers[0].send(ForwardRequest(1, i, f"a{i}"))
            peers[1].send(ForwardRequest(1, i, f"b{i}"))
        # The main thread is "computing": it takes nothing, and the six batches get uploaded.
        wait_uploaded(intake, 6)
        assert set(runner.upload_threads) == {INTAKE_THREAD}
        for peer in peers:
            peer.send(NoMoreBatches())
        taken = drain(intake)
        assert [b for b in taken if b.startswith("a")] == ["a0", "a1", "a2"]  # each peer's order kept
        assert [b for b in taken if b.startswith("b")] == ["b0", "b1", "b2"]
        intake.join(TIMEOUT_S)
        assert not intake.thread.is_alive()
        assert intake.lost == set()

    run_guarded(scenario, TIMEOUT_S, "the intake serving two peers")


def test_control_messages_run_in_the_main_thread_before_later_batches() -> None:
    def scenario() -> None:
        peer = Peer()
        control, control_writer = Pipe()
        runners: dict[Any, Any] = {}
        handled: list[tuple[str, Any]] = []

        def on_control(message: Any) -> None:
            handled.append((threading.current_thread().name, message))
            if isinstance(message, StartGPURun):
                runners[(message.run_id, 1)] = FakeRunner()
            else:
                del runners[(message.run_id, 1)]

        intake = make_intake([peer], runners, control, on_control)
        intake.start()
        control_writer.send_bytes(dumps_message(StartGPURun(7, b"")))
        peer.send(ForwardRequest(1, 0, "x", run_id=7))
        entry, _ = run_next(intake)
        assert entry is not None and entry[2] == "x"
        assert handled == [(threading.current_thread().name, StartGPURun(7, b""))]
        assert runners[(7, 1)].upload_threads == [INTAKE_THREAD]
        control_writer.send_bytes(dumps_message(EndGPURun(7)))
        peer.send(NoMoreBatches())
        control_writer.close()
        assert drain(intake) == []
        assert [message for _, message in handled] == [StartGPURun(7, b""), EndGPURun(7)]
        assert {thread for thread, _ in handled} == {threading.current_thread().name}
        intake.join(TIMEOUT_S)
        assert not intake.thread.is_alive()

    run_guarded(scenario, TIMEOUT_S, "the intake with a control pipe")


def test_a_batch_that_fails_to_upload_is_answered_and_the_next_ones_go_on() -> None:
    def scenario() -> None:
        peer = Peer()
        intake = make_intake([peer], {(None, 1): FakeRunner(fail_on="bad")})
        intake.start()
        for i, batch in enumerate(["ok0", "bad", "ok2"]):
            peer.send(ForwardRequest(1, i, batch))
        peer.send(NoMoreBatches())
        assert drain(intake) == ["ok0", "ok2"]
        failed = peer.sender.queue.get_nowait()
        assert isinstance(failed, ForwardFailed) and failed.batch_id == 1
        assert isinstance(failed.error.exc, ValueError) and "cannot upload 'bad'" in str(failed.error.exc)
        intake.join(TIMEOUT_S)

    run_guarded(scenario, TIMEOUT_S, "the intake with a failing upload")


def test_a_peer_that_dies_is_lost_and_its_batches_already_read_are_kept() -> None:
    def scenario() -> None:
        peers = [Peer(), Peer()]
        intake = make_intake(peers, {(None, 1): FakeRunner()})
        intake.start()
        peers[0].send(ForwardRequest(1, 0, "before death"))
        wait_uploaded(intake, 1)
        peers[0].die()
        peers[1].send(NoMoreBatches())
        assert drain(intake) == ["before death"]
        assert intake.lost == {0}
        intake.join(TIMEOUT_S)

    run_guarded(scenario, TIMEOUT_S, "the intake losing a peer")


def test_a_request_that_cannot_be_unpickled_is_raised_in_the_main_thread() -> None:
    def scenario() -> None:
        peer = Peer()
        intake = make_intake([peer], {(None, 1): FakeRunner()})
        intake.start()
        peer.batch_writer.send_bytes(b"\x00not a pickle")
        with pytest.raises(Exception) as raised:
            drain(intake)
        assert not isinstance(raised.value, AssertionError)
        intake.join(TIMEOUT_S)
        assert not intake.thread.is_alive()
        peer.die()

    run_guarded(scenario, TIMEOUT_S, "the intake with a corrupt request")
