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


def test_tasks_go_to_actors_as_they_become_ready() -> None:
    dispatch: ActorDispatch[str] = ActorDispatch(num_workers=3, max_in_flight=2, window=None, ready=False)
    assert dispatch.worker_for_new_task() is None  # no actor has loaded the plan yet
    dispatch.set_ready(2, True)  # the first actor up takes the first tasks, up to its bound
    handed = []
    while (worker := dispatch.worker_for_new_task()) is not None:
        dispatch.handed_out(worker)
        handed.append(worker)
    assert handed == [2, 2]
    dispatch.set_ready(0, True)
    assert dispatch.worker_for_new_task() == 0
    # An actor being replaced gets nothing, reruns included, until its replacement is ready.
    dispatch.set_ready(0, False)
    dispatch.rerun("task 1")
    assert dispatch.rerun_for() is None and dispatch.worker_for_new_task() is None
    dispatch.finished(2)
    assert dispatch.rerun_for() == (2, "task 1")
