"""The Ray driver's dispatch state (pure: no cluster, no actor)."""

from __future__ import annotations

from streamproc.backends.ray.dispatch import ActorDispatch


def test_in_flight_bound_and_least_busy_first() -> None:
    dispatch: ActorDispatch[str] = ActorDispatch(num_workers=3, max_in_flight=2, window=None)
    handed = []
    while (worker := dispatch.worker_for_new_task()) is not None:
        dispatch.handed_out(worker)
        handed.append(worker)
    assert handed == [0, 1, 2, 0, 1, 2] and dispatch.in_flight == [2, 2, 2]
    dispatch.finished(1)
    assert dispatch.worker_for_new_task() == 1


def test_window_bounds_what_the_reorder_buffer_holds() -> None:
    dispatch: ActorDispatch[str] = ActorDispatch(num_workers=2, max_in_flight=10, window=3)
    for _ in range(3):
        worker = dispatch.worker_for_new_task()
        assert worker is not None
        dispatch.handed_out(worker)
    assert dispatch.worker_for_new_task() is None  # index 3 >= released 0 + window 3
    dispatch.released = 1
    assert dispatch.worker_for_new_task() is not None


def test_stop_after_and_reruns_first() -> None:
    dispatch: ActorDispatch[str] = ActorDispatch(num_workers=1, max_in_flight=1, window=None)
    dispatch.handed_out(0)
    dispatch.stop_after(0)
    dispatch.finished(0)
    assert dispatch.no_new_tasks and dispatch.worker_for_new_task() is None
    dispatch.rerun("task 0 again")
    assert dispatch.reruns_waiting == 1
    assert dispatch.rerun_for() == (0, "task 0 again") and dispatch.reruns_waiting == 0
