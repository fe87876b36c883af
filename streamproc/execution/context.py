"""Per-process execution state: where tasks run, and how ``forward`` reaches its device.

An :class:`ExecutionContext` is made once per process (or worker thread) that runs tasks and
shared by all the tasks it runs. Its forward runners are keyed by stage index, so a
``map_gpu`` stage finds the same runner (and the same model on the same device) for every
task; the instances of the classes passed to ``map``/``map_batches``/``map_gpu`` are cached
the same way, by stage index and role, so each is constructed once per context (once per
worker process or thread).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional, Protocol

from .worker_info import BASE_SEED, WorkerInfo, WorkerKind, task_seed

if TYPE_CHECKING:
    from ..gpu.forward import LocalForwardRunners
    from ..gpu.model_cache import ModelSettings
    from ..gpu.placement import DeviceSpec
    from ..ops import WorkerClass
    from ..plan import Plan, Stage
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
        device: where an in-process forward runs (None: CUDA when available, else the CPU); a
            group of devices splits the models over them (:mod:`streamproc.gpu.placement`).
        autocast: the ``set_processing(autocast=...)`` value.
        torch_threads: torch's intra-op thread count while ``forward`` runs here (None: leave it).
        kind: the kind of worker this context serves, for :func:`streamproc.get_worker_info`
            (``"main"``, ``"thread"``, ``"cpu"``).
        index: the worker's index among its kind (0 in the main process).
        forward_here: with ``make_forward_runner``, whether the runners it makes run forward in
            this process, on ``device`` (the threads backend's shared runners) rather than
            sending batches elsewhere (GPU workers); for :attr:`WorkerInfo.device`.
        models: ``gpu_memory_budget`` and ``model_dtype`` for forward run in this process.
    """

    def __init__(
        self,
        where: str = "main process",
        make_forward_runner: Optional[ForwardRunnerFactory] = None,
        device: Optional[DeviceSpec] = None,
        autocast: Any = None,
        torch_threads: Optional[int] = None,
        kind: WorkerKind = "main",
        index: int = 0,
        forward_here: bool = False,
        models: Optional[ModelSettings] = None,
    ) -> None:
        self.where = where
        self.device = device
        self.autocast = autocast
        self.torch_threads = torch_threads
        self._make_forward_runner = make_forward_runner
        self._runners: dict[int, ForwardRunner] = {}
        self._instances: dict[tuple[int, str], Callable[..., Any]] = {}
        self.error_policy: Optional[ErrorPolicy] = None
        self.kind: WorkerKind = kind
        self.index = index
        self._forward_here = forward_here or make_forward_runner is None
        self._resolved_device: Optional[tuple[Optional[str]]] = None
        self.models = models
        #: The in-process runners' factory and model cache, made at the first ``map_gpu`` stage.
        self.local_forwards: Optional[LocalForwardRunners] = None

    def instance(self, stage: Stage, role: str, spec: WorkerClass) -> Callable[..., Any]:
        """The instance of ``spec``'s class for ``role`` of ``stage``, constructed on first use.

        Runs where the op runs (main process with the simple backend, a worker thread, a CPU
        worker). See :meth:`streamproc.ops.WorkerClass.build` for the errors it raises.
        """
        key = (stage.index, role)
        made = self._instances.get(key)
        if made is None:
            made = self._instances[key] = spec.build(f"{stage.name}, {role}")
        return made

    def worker_info(self, plan: Plan, task_key: int) -> WorkerInfo:
        """The :class:`WorkerInfo` of this context while it runs task ``task_key`` of ``plan``."""
        selection = plan.task_selection
        base = getattr(plan.options, "seed", None)
        seed = task_seed(task_key, BASE_SEED if base is None else int(base))
        return WorkerInfo(self.kind, self.index, selection.rank if selection is not None else 0,
                          self._device_of(plan), seed, task_key)

    def _device_of(self, plan: Plan) -> Optional[str]:
        """Where forward runs from this context (resolved once; None without a ``map_gpu`` stage)."""
        if self._resolved_device is None:
            device: Optional[str] = None
            if plan.has_gpu_stage and self._forward_here:
                from ..gpu.device import default_device
                from ..gpu.placement import first_device

                device = first_device(self.device) if self.device else default_device()
            self._resolved_device = (device,)
        return self._resolved_device[0]

    def forward_runner(self, stage: Stage) -> ForwardRunner:
        """The runner of ``stage`` (a ``map_gpu`` stage), made on first use."""
        runner = self._runners.get(stage.index)
        if runner is None:
            if self._make_forward_runner is not None:
                runner = self._make_forward_runner(stage)
            else:
                if self.local_forwards is None:
                    from ..gpu.forward import LocalForwardRunners

                    self.local_forwards = LocalForwardRunners(self.device, self.autocast, self.torch_threads, self.models)
                runner = self.local_forwards(stage)
            self._runners[stage.index] = runner
        return runner
