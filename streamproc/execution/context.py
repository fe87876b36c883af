"""Per-process execution state: where tasks run, and how ``forward`` reaches its device.

An :class:`ExecutionContext` is made once per process (or worker thread) that runs tasks and
shared by all the tasks it runs. Its forward runners are keyed by stage index, so a
``map_gpu`` stage finds the same runner (and the same model on the same device) for every
task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional, Protocol

if TYPE_CHECKING:
    from ..plan import Stage
    from .error_policy import ErrorPolicy


class ForwardRunner(Protocol):
    """Runs ``forward`` of one ``map_gpu`` stage over ``(records, prepared_batch)`` pairs.

    ``run`` yields ``(records, outputs)`` pairs in the order it received them; outputs are on
    the host (CPU), ready for ``postprocess``.
    """

    def run(self, batches: Iterator[tuple[list[Any], Any]]) -> Iterator[tuple[list[Any], Any]]: ...


#: Builds the runner of a ``map_gpu`` stage (a remote one sends batches to GPU workers).
ForwardRunnerFactory = Callable[["Stage"], ForwardRunner]


class ExecutionContext:
    """Per-process state shared by the tasks a process runs (forward runners, worker name).

    ``error_policy`` is the one per-task field: the recorder of the task running now
    (:class:`~streamproc.execution.error_policy.ErrorPolicy`), set by ``run_task`` when
    ``on_error`` is not ``"raise"``, else None. A context serves one thread at a time.

    Args:
        where: names the process in error messages, e.g. ``"main process"`` or ``"cpu worker 2"``.
        make_forward_runner: builds the runner for a ``map_gpu`` stage; by default forward runs
            in this process (see :class:`streamproc.gpu.LocalForwardRunner`).
        device: where an in-process forward runs (None: CUDA when available, else the CPU).
        autocast: the ``set_processing(autocast=...)`` value.
        torch_threads: torch's intra-op thread count while ``forward`` runs here (None: leave it).
    """

    def __init__(
        self,
        where: str = "main process",
        make_forward_runner: Optional[ForwardRunnerFactory] = None,
        device: Optional[str] = None,
        autocast: Any = None,
        torch_threads: Optional[int] = None,
    ) -> None:
        self.where = where
        self.device = device
        self.autocast = autocast
        self.torch_threads = torch_threads
        self._make_forward_runner = make_forward_runner
        self._runners: dict[int, ForwardRunner] = {}
        self.error_policy: Optional[ErrorPolicy] = None

    def forward_runner(self, stage: Stage) -> ForwardRunner:
        """The runner of ``stage`` (a ``map_gpu`` stage), made on first use."""
        runner = self._runners.get(stage.index)
        if runner is None:
            if self._make_forward_runner is not None:
                runner = self._make_forward_runner(stage)
            else:
                from ..gpu import DeviceForward, LocalForwardRunner

                op: Any = stage.op
                runner = LocalForwardRunner(
                    DeviceForward(op.forward, self.device, self.autocast, stage.name, op.batch_size, self.torch_threads)
                )
            self._runners[stage.index] = runner
        return runner
