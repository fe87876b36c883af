"""``stream.explain()``: the plan as text, with the defaults resolved as the backend would (main process).

It starts nothing and reads no record: it builds the plan (as a sink would), then asks the
backend's own resolution functions what a run would start (the multiprocessing backend's
:func:`~streamproc.backends.multiprocessing.backend.pool_for`: worker counts from
``cpu_count()``, GPU worker devices, start methods, dispatch cycles; the threads backend's
default thread count). A machine check that would fail the run (a device this machine lacks)
fails here too, with the same error. The source's size comes from metadata only
(:meth:`~streamproc.io.base.Source.num_records`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .gpu.placement import describe_device_spec
from .ops import BatchedOp, MapGPU, Op, WorkerClass, callable_name
from .options import DeviceSpec, device_names
from .plan import Plan, Stage

if TYPE_CHECKING:
    from .stream import Stream

#: Width of the first column ("stage 1  map(clean)") before the "runs in" column.
NAME_WIDTH = 50


@dataclass(frozen=True)
class _Placement:
    """Where the parts of a run go, as the backend would resolve them."""

    backend: str
    #: Where ops, ``prepare_batch`` and ``postprocess`` run ("CPU worker", "main process"...).
    cpu_side: str
    #: Where ``forward`` runs, device included.
    forward: str
    #: Where a task's records are read or decoded.
    reading: str
    #: The "workers" lines.
    workers: list[str]
    #: Each CPU worker's dispatch cycle of GPU workers (empty without GPU workers).
    cycles: tuple[tuple[int, ...], ...] = ()
    #: The device groups forward runs on (model parallel), each once, in worker order.
    groups: tuple[tuple[str, ...], ...] = ()


def explain(stream: Stream) -> str:
    """The plan of ``stream`` as text: stages and where each runs, batch and task sizes,
    workers, devices, start methods and each CPU worker's dispatch cycle to the GPU workers.

    Runs in the main process; starts no process or thread and reads no record.

    >>> import streamproc as sp
    >>> print(sp.from_iterable(range(10)).map(abs).explain())  # doctest: +NORMALIZE_WHITESPACE
    streamproc plan: backend 'simple', deterministic=True
    source   from_iterable(range(0, 10)): 10 records
             tasks of up to 1024 records, pulled from the iterable in the main process
    tasks    task_size=1024 records (a batch never spans two tasks)
    stages
      1  map(abs)                                      main process
    sink     main process, in task order
    workers  none: every task runs in the calling thread, in order
    """
    from .plan import build_plan

    plan = build_plan(stream)
    placement = _placement(plan)
    options = plan.options
    lines = [f"streamproc plan: backend {placement.backend!r}, deterministic={options.deterministic}"]
    lines += _source_lines(plan, placement)
    lines.append(f"tasks    task_size={plan.task_size} records (a batch never spans two tasks)")
    lines.append("stages")
    for stage in plan.stages:
        lines += _stage_lines(stage, placement)
        if isinstance(stage.op, MapGPU):
            lines += _split_lines(stage.op, placement.groups)
    lines.append(f"sink     {_sink_text(plan, placement)}")
    lines.append(f"workers  {placement.workers[0]}")
    lines += [f"         {line}" for line in placement.workers[1:]]
    if placement.cycles:
        lines.append("dispatch each CPU worker's cycle of GPU workers (get_dispatch_schedule):")
        for cpu, cycle in enumerate(placement.cycles):
            lines.append(f"  cpu worker {cpu} -> {', '.join(f'gpu worker {gpu}' for gpu in cycle)}")
    return "\n".join(lines)


def _placement(plan: Plan) -> _Placement:
    options = plan.options
    backend = options.effective_backend
    if backend == "multiprocessing":
        return _multiprocessing_placement(plan)
    device = _in_process_device(plan)
    spec = plan.options.gpu_worker_devices[0] if plan.has_gpu_stage and plan.options.gpu_worker_devices else None
    groups = (spec,) if isinstance(spec, tuple) else ()
    if backend == "threads":
        from .backends.multiprocessing.cpu_budget import default_num_cpu_workers

        threads = options.num_cpu_workers or default_num_cpu_workers(0)
        counted = "" if options.num_cpu_workers else ", default: cpu_count()"
        return _Placement(
            backend, "worker thread", f"worker thread, on {device}", "worker thread",
            [f"{threads} worker thread(s) in the main process (streamproc-thread-0..{threads - 1}{counted})"],
            groups=groups,
        )
    if backend == "simple":
        return _Placement(
            backend, "main process", f"main process, on {device}", "main process",
            ["none: every task runs in the calling thread, in order"], groups=groups,
        )
    worker = f"{backend} worker"
    return _Placement(backend, worker, worker, worker, [f"resolved by the {backend!r} backend"])


def _in_process_device(plan: Plan) -> str:
    """The device ``forward`` runs on without GPU workers (as the simple and threads backends pick it)."""
    if not plan.has_gpu_stage:
        return "-"
    devices = plan.options.gpu_worker_devices
    if devices:
        return describe_device_spec(devices[0]) + (" (model parallel)" if isinstance(devices[0], tuple) else "")
    from .gpu.device import default_device

    return default_device()


def _multiprocessing_placement(plan: Plan) -> _Placement:
    from .backends.multiprocessing import cpu_budget
    from .backends.multiprocessing.backend import pool_for

    pool = pool_for(plan)  # the backend's own resolution: nothing is started
    topology = pool.topology
    cpu_count = topology.num_cpu_workers
    gpu_devices = topology.gpu_devices
    counted = ""
    if not plan.options.num_cpu_workers:
        counted = f", default: cpu_count()={cpu_budget.cpu_count()}" + (" less one per GPU worker" if gpu_devices else "")
    workers = [f"{cpu_count} CPU worker process(es) (start method {pool.cpu_start_method!r}{counted})"]
    if gpu_devices:
        forward = f"GPU worker, on {_device_list(gpu_devices)}"
        workers.append(f"{len(gpu_devices)} GPU worker process(es) (start method {pool.gpu_start_method!r}):")
        workers += [
            f"  gpu worker {index} on {describe_device_spec(spec)}" + (" (model parallel)" if isinstance(spec, tuple) else "")
            for index, spec in enumerate(gpu_devices)
        ]
    else:
        forward = "CPU worker, on cpu (no GPU worker)" if plan.has_gpu_stage else "-"
    groups = tuple(dict.fromkeys(spec for spec in gpu_devices if isinstance(spec, tuple)))
    cycles = topology.cycles if gpu_devices else ()
    return _Placement("multiprocessing", "CPU worker", forward, "CPU worker", workers, cycles, groups)


def _device_list(devices: tuple[DeviceSpec, ...]) -> str:
    return ", ".join(dict.fromkeys(device_names(devices)))  # in order, each once


def _split_lines(op: MapGPU, groups: tuple[tuple[str, ...], ...]) -> list[str]:
    """How forward's models would be split over each device group (computed here, nothing moved)."""
    lines = []
    for group in groups:
        where = f"         split over {describe_device_spec(group)}: "
        if op.place is not None:
            lines.append(where + f"by place={callable_name(op.place)}, in the worker")
        elif isinstance(op.forward, WorkerClass):
            lines.append(where + "by block sizes, once the forward class is built in the worker")
        else:
            lines += [where + text for text in _planned_splits(op.forward, group)]
    return lines


def _planned_splits(forward: Any, group: tuple[str, ...]) -> list[str]:
    from .gpu.models import find_modules
    from .gpu.partition import outermost, plan_placement

    texts = []
    for module in outermost(find_modules(forward)):
        planned = plan_placement(module, group)
        if planned is None:
            texts.append(f"{type(module).__name__} whole on {group[0]} (no Sequential/ModuleList layer stack)")
        else:
            texts.append(f"{planned.model}: {planned.describe()}")
    return texts


def _source_lines(plan: Plan, placement: _Placement) -> list[str]:
    from .io.jsonl import JsonlSource
    from .io.limit import LimitSource
    from .io.memory import IterableSource, PandasSource
    from .io.parquet import ParquetSource

    source = plan.source
    size = source.num_records()
    counted = ": size unknown" if size is None else f": {size:,} record{'' if size == 1 else 's'}"
    head = f"source   {source.describe()}{counted}"
    where = placement.reading
    if isinstance(source, LimitSource):
        inner = source.inner_stream().options.effective_backend
        how = f"the first {source.n} records of an inner run (backend {inner!r}) of the ops before limit(), in the main process"
    elif isinstance(source, IterableSource):
        pulled = "main process" if placement.backend == "multiprocessing" else where
        how = f"tasks of up to {plan.task_size} records, pulled from the iterable in the {pulled}"
    elif isinstance(source, ParquetSource):
        how = f"one task per row group, listed in the main process, decoded in the {where}"
    elif isinstance(source, PandasSource):
        how = f"row ranges of {plan.task_size}, converted to dicts in the {where}"
    elif isinstance(source, JsonlSource):
        how = f"runs of {plan.task_size} lines of one file, read in the main process, parsed in the {where}"
    else:
        how = f"tasks from {type(source).__name__}.iter_tasks (main process), read in the {where}"
    if plan.task_selection is not None:
        how += "; this run does only the tasks its selection keeps (resume or shard)"
    return [head, f"         {how}"]


def _stage_lines(stage: Stage, placement: _Placement) -> list[str]:
    op = stage.op
    label = f"  {stage.index}  {_op_label(op)}"
    if not isinstance(op, MapGPU):
        return [_row(label, placement.cpu_side + _batching(op))]
    postprocess = " (default: one row per record)"
    if op.postprocess is not None:
        postprocess = _alias(callable_name(op.postprocess), "postprocess")
    return [
        _row(label, _batching(op).lstrip("; ")),
        _row(f"       prepare_batch{_alias(callable_name(op.prepare_batch), 'prepare_batch')}", placement.cpu_side),
        _row(f"       forward{_alias(callable_name(op.forward), 'forward')}", placement.forward),
        _row(f"       postprocess{postprocess}", placement.cpu_side),
    ]


def _op_label(op: Op) -> str:
    """``op.describe()`` without its batch size (shown in the next column)."""
    text = op.describe()
    if isinstance(op, BatchedOp) and op.batch_size is not None:
        text = text.replace(f", batch_size='{op.batch_size}'", "")
    return text


def _alias(name: str, role: str) -> str:
    return "" if name == role else f" = {name}"


def _batching(op: object) -> str:
    if not isinstance(op, BatchedOp) or op.batch_size is None:
        return ""
    by = ""
    if op.batch_by is not None:
        by = f", batch_by={callable_name(op.batch_by) if callable(op.batch_by) else repr(op.batch_by)}"
    return f"; batches of {op.batch_size}{by}"


def _row(left: str, right: str) -> str:
    return f"{left:<{NAME_WIDTH}} {right}" if len(left) < NAME_WIDTH else f"{left}\n{'':<{NAME_WIDTH}} {right}"


def _sink_text(plan: Plan, placement: _Placement) -> str:
    order = "in task order" if plan.options.deterministic else "in completion order"
    text = f"main process, {order}"
    if placement.backend == "multiprocessing" and not plan.options.deterministic:
        text += " (write_parquet writes its part files in the CPU workers)"
    return text
