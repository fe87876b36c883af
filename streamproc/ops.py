"""Op types: what a stream does to records, as picklable values (no I/O, no processes).

Each op turns an iterator of *chunks* (lists of records) into an iterator of chunks with
:meth:`Op.apply`. Working on lists keeps the per-record cost of the engine to the builtin
``map``/``filter`` call itself: error tagging and generator hops happen once per chunk. The
executor chains the ops of a stream once per task (see :mod:`streamproc.execution.task`), so an op
never sees records of two tasks at once: this is what makes batch composition independent of
the backend and of the number of workers.

Error attribution: every stage's output runs inside :func:`streamproc.stage_tags.tagged`, and
an exception is tagged by the first stage it crosses, so each error names the stage (and, for
``map_gpu``, the callable) that raised it (see :mod:`streamproc.stage_tags`).

Error policy: with ``on_error="raise"`` (``ctx.error_policy is None``) each op runs the code
path above and nothing else; otherwise it runs the same fast path first and isolates the
failing records only when a chunk or batch raises (see :mod:`streamproc.execution.isolation`).

Where ops run: in the main process with the simple backend, in a CPU worker otherwise, except
``MapGPU.forward``, which runs wherever the execution context's forward runner sends it
(in-process, or a GPU worker).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

from .batching import BatchBy, BatchSize, iter_batches
from .errors import add_context_note
from .execution import isolation, sorting
from .stage_tags import tag_stage, tagged

if TYPE_CHECKING:
    from .execution.context import ExecutionContext
    from .plan import Stage

def callable_name(fn: Any) -> str:
    """A short readable name for a user callable, for reprs and error messages."""
    if isinstance(fn, functools.partial):
        return callable_name(fn.func)
    if isinstance(fn, WorkerClass):
        return callable_name(fn.cls)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if name else type(fn).__name__


@dataclass(frozen=True)
class WorkerClass:
    """A user class that an op constructs once per worker, with ``kwargs``, and then calls.

    What a stream stores in place of a callable when ``map``, ``map_batches`` or ``map_gpu``
    is given a class (as Ray Data does): the class travels to the workers (pickled with the
    plan) and :meth:`build` runs there, lazily, on first use: once per CPU worker process or
    worker thread (cached on its :class:`~streamproc.execution.context.ExecutionContext` by
    stage index and role), or, for a ``map_gpu`` forward, once per process that runs forward
    (:class:`~streamproc.gpu.forward.DeviceForward`). Never in the main process of the
    multiprocessing backend.
    """

    cls: type
    kwargs: Optional[dict[str, Any]] = None

    def build(self, where: str) -> Callable[..., Any]:
        """``cls(**kwargs)``, checked to be callable. Runs where the op runs.

        Raises:
            TypeError: the instance is not callable (the class defines no ``__call__``).
            Exception: whatever the constructor raises, with a note naming ``where`` (the
                stage and role) and the class.
        """
        name = callable_name(self.cls)
        try:
            instance = self.cls(**(self.kwargs or {}))
        except Exception as exc:
            tag_stage(exc, where)
            add_context_note(exc, f"streamproc: raised by the constructor of {name} ({where})")
            raise
        if not callable(instance):
            raise TypeError(
                f"{where}: instances of {name} are not callable: a class passed to map, map_batches or "
                f"map_gpu must define __call__ (it is called like the function it stands for)"
            )
        return instance


def resolve(fn: Any, ctx: ExecutionContext, stage: Stage, role: str) -> Any:
    """``fn`` itself, or the context's instance of it when it is a :class:`WorkerClass`."""
    return ctx.instance(stage, role, fn) if isinstance(fn, WorkerClass) else fn


def _is_state_class(value: Any) -> bool:
    """Whether ``value`` is a class with callable instances (it or a base defines ``__call__``).

    Other classes (``str``, ``list``, a record dataclass) are called per record as before.
    """
    return isinstance(value, type) and any("__call__" in vars(k) for k in value.__mro__ if k is not object)


def per_worker(value: Any, kwargs: Optional[dict[str, Any]], method: str, param: str, stage: str) -> Any:
    """``value``, or a :class:`WorkerClass` of it with constructor ``kwargs`` when it is a callable class.

    Runs in the main process, as the stream is built.

    Raises:
        TypeError: ``kwargs`` is not a dict, or given for a ``value`` that is not a class, or
            for a class whose instances are not callable.
    """
    if kwargs is None:
        return WorkerClass(value) if _is_state_class(value) else value
    if not isinstance(kwargs, dict):
        raise TypeError(f"{method}(): fn_kwargs must be a dict or None, got {type(kwargs).__name__}")
    if not isinstance(value, type):
        raise TypeError(
            f"{method}(): fn_kwargs are constructor arguments of a class passed as {param}, but {param} "
            f"{callable_name(value)!r} is not a class (pass per-call arguments with kwargs, or functools.partial)"
        )
    if not _is_state_class(value):
        raise TypeError(
            f"{method}() {stage}: instances of {param} class {callable_name(value)!r} are not callable: "
            f"a class constructed once per worker must define __call__"
        )
    return WorkerClass(value, dict(kwargs))


#: The roles of ``map_gpu`` that ``fn_kwargs`` names (one dict of constructor kwargs per class).
MAP_GPU_ROLES = ("prepare_batch", "forward", "postprocess")


def map_gpu_kwargs(fn_kwargs: Optional[dict[str, Any]], callables: dict[str, Any]) -> dict[str, Optional[dict[str, Any]]]:
    """``map_gpu``'s ``fn_kwargs`` (a dict by role) split per role; checks its keys."""
    if fn_kwargs is None:
        return dict.fromkeys(MAP_GPU_ROLES)
    if not isinstance(fn_kwargs, dict):
        raise TypeError(f"map_gpu(): fn_kwargs must be a dict by role, got {type(fn_kwargs).__name__}")
    unknown = [key for key in fn_kwargs if key not in MAP_GPU_ROLES]
    if unknown:
        raise TypeError(
            f"map_gpu(): fn_kwargs is a dict by role ({', '.join(MAP_GPU_ROLES)}) of constructor kwargs, "
            f"e.g. fn_kwargs={{'forward': {{'name': ...}}}}; unknown key(s) {unknown}"
        )
    for role, kwargs in fn_kwargs.items():
        if callables[role] is None:
            raise TypeError(f"map_gpu(): fn_kwargs[{role!r}] given but no {role} was passed")
        if not isinstance(kwargs, dict):
            raise TypeError(f"map_gpu(): fn_kwargs[{role!r}] must be a dict of constructor kwargs, got {type(kwargs).__name__}")
    return {role: fn_kwargs.get(role) for role in MAP_GPU_ROLES}


@dataclass(frozen=True)
class Op:
    """Base of all ops. Subclasses implement :meth:`apply` and :meth:`describe`.

    ``apply``'s output needs no tag of its stage: the executor wraps it (see the module
    docstring); an op that runs several user callables tags each part itself (``map_gpu``).
    """

    def apply(self, chunks: Iterator[list[Any]], ctx: ExecutionContext, stage: Stage) -> Iterator[list[Any]]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def callables(self) -> dict[str, Any]:
        """The user callables of this op by role, to name them in serialization errors."""
        return {}


def records_of(chunks: Iterator[list[Any]]) -> Iterator[Any]:
    """The records of consecutive chunks, one by one (for ops that regroup records)."""
    return itertools.chain.from_iterable(chunks)


@dataclass(frozen=True)
class Map(Op):
    fn: Callable[..., Any]
    kwargs: Optional[dict[str, Any]] = None

    def apply(self, chunks: Iterator[list[Any]], ctx: ExecutionContext, stage: Stage) -> Iterator[list[Any]]:
        fn = resolve(self.fn, ctx, stage, "fn")
        fn = functools.partial(fn, **self.kwargs) if self.kwargs else fn
        policy = ctx.error_policy
        if policy is not None:
            return isolation.map_records(chunks, fn, policy, stage.name)
        return (list(map(fn, chunk)) for chunk in chunks)

    def describe(self) -> str:
        return f"map({callable_name(self.fn)})"

    def callables(self) -> dict[str, Any]:
        return {"map fn": self.fn, "map kwargs": self.kwargs}


@dataclass(frozen=True)
class Filter(Op):
    pred: Callable[[Any], Any]

    def apply(self, chunks: Iterator[list[Any]], ctx: ExecutionContext, stage: Stage) -> Iterator[list[Any]]:
        pred = self.pred
        policy = ctx.error_policy
        if policy is not None:
            return isolation.filter_records(chunks, pred, policy, stage.name)
        return (list(filter(pred, chunk)) for chunk in chunks)

    def describe(self) -> str:
        return f"filter({callable_name(self.pred)})"

    def callables(self) -> dict[str, Any]:
        return {"filter predicate": self.pred}


@dataclass(frozen=True)
class Flatten(Op):
    def apply(self, chunks: Iterator[list[Any]], ctx: ExecutionContext, stage: Stage) -> Iterator[list[Any]]:
        policy = ctx.error_policy
        if policy is not None:
            return isolation.flatten_records(chunks, policy, stage.name)
        return (list(itertools.chain.from_iterable(chunk)) for chunk in chunks)

    def describe(self) -> str:
        return "flatten()"


@dataclass(frozen=True)
class BatchedOp(Op):
    """An op that groups records into batches first; its size resolves at run time."""

    batch_size: Optional[BatchSize] = field(default=None, kw_only=True)
    batch_by: BatchBy = field(default=None, kw_only=True)
    #: Sort the task's records by this key before batching (see :mod:`.execution.sorting`).
    sort_by: sorting.SortBy = field(default=None, kw_only=True)

    def resolved(self, default_size: BatchSize, default_by: BatchBy) -> BatchedOp:
        """This op with the stream's defaults filled in where it has none.

        Size and ``batch_by`` are filled in independently: a stage with its own
        ``batch_size="8192 tokens"`` but no ``batch_by`` measures records with the stream's
        ``set_processing(batch_by=...)``.
        """
        size = self.batch_size if self.batch_size is not None else default_size
        by = self.batch_by if self.batch_by is not None else default_by
        if size is self.batch_size and by is self.batch_by:
            return self
        return replace(self, batch_size=size, batch_by=by)

    def _batches(self, chunks: Iterator[list[Any]]) -> Iterator[list[Any]]:
        """The batches of this stage: records regrouped across the chunks of one task."""
        assert self.batch_size is not None, "resolve batch sizes before running"
        return iter_batches(records_of(chunks), self.batch_size, self.batch_by)

    def _size_text(self) -> str:
        text = f", batch_size='{self.batch_size}'" if self.batch_size is not None else ""
        return text + (f", sort_by={sorting.describe_sort_by(self.sort_by)}" if self.sort_by is not None else "")


@dataclass(frozen=True)
class MapBatches(BatchedOp):
    fn: Callable[[list[Any]], Iterable[Any]]

    def apply(self, chunks: Iterator[list[Any]], ctx: ExecutionContext, stage: Stage) -> Iterator[list[Any]]:
        if self.sort_by is not None:
            return tagged(sorting.apply_sorted(self, chunks, ctx, stage), stage.name)
        fn = resolve(self.fn, ctx, stage, "fn")
        policy = ctx.error_policy
        if policy is not None:
            return isolation.map_batches_isolated(self._batches(chunks), fn, policy, stage.name)
        return (list(fn(batch)) for batch in self._batches(chunks))

    def describe(self) -> str:
        return f"map_batches({callable_name(self.fn)}{self._size_text()})"

    def callables(self) -> dict[str, Any]:
        return {"map_batches fn": self.fn, "map_batches sort_by": self.sort_by}


def default_postprocess(records: list[Any], outputs: Any) -> list[Any]:
    """One output row per record: row ``i`` of every tensor/array in ``outputs``.

    Runs where ``postprocess`` runs (a CPU worker, or the main process with the simple
    backend). Tensors are converted to numpy on the way; a dict of outputs gives one dict per
    record, a tuple gives one tuple per record.

    Raises:
        ValueError: ``outputs`` do not hold one row per record: a 0-d output (``forward``
            returned a scalar, e.g. a loss), keys of different lengths, or another row count.
            The message says to pass a ``postprocess`` to ``map_gpu``.
    """
    from .gpu.device import UnsplittableOutputError, split_rows

    advice = "pass a postprocess function to map_gpu to match outputs to records"
    try:
        rows = split_rows(outputs)
    except UnsplittableOutputError as exc:
        raise ValueError(f"forward returned {exc.what} for a batch of {len(records)} records: {advice}") from None
    if len(rows) != len(records):
        raise ValueError(f"forward returned {len(rows)} rows for a batch of {len(records)} records: {advice}")
    return rows


@dataclass(frozen=True)
class MapGPU(BatchedOp):
    """A deep-learning stage: ``prepare_batch`` and ``postprocess`` on the CPU, ``forward`` on a device."""

    prepare_batch: Callable[[list[Any]], Any]
    forward: Callable[[Any], Any]
    postprocess: Optional[Callable[[list[Any], Any], Iterable[Any]]] = None
    #: ``place(module, devices)``: places forward's models on the devices of the process that
    #: runs forward, instead of the engine (see :mod:`streamproc.gpu.placement`).
    place: Optional[Callable[[Any, list[Any]], Any]] = field(default=None, kw_only=True)

    def apply(self, chunks: Iterator[list[Any]], ctx: ExecutionContext, stage: Stage) -> Iterator[list[Any]]:
        if self.sort_by is not None:
            return tagged(sorting.apply_sorted(self, chunks, ctx, stage), stage.name)
        postprocess = resolve(self.postprocess, ctx, stage, "postprocess") or default_postprocess
        prepare_batch = resolve(self.prepare_batch, ctx, stage, "prepare_batch")
        policy = ctx.error_policy
        if policy is not None:
            steps = isolation.MapGPUSteps(stage.name, prepare_batch, ctx.forward_runner(stage), postprocess)
            return tagged(isolation.map_gpu_isolated(self._batches(chunks), steps, policy), stage.name)
        # Each part is tagged separately so that an error names the callable that raised it.
        batches = tagged(self._batches(chunks), stage.name)
        prepared = tagged(((batch, prepare_batch(batch)) for batch in batches), f"{stage.name}, prepare_batch")
        done = tagged(ctx.forward_runner(stage).run(prepared), f"{stage.name}, forward")
        return tagged((list(postprocess(records, outputs)) for records, outputs in done), f"{stage.name}, postprocess")

    def describe(self) -> str:
        names = [callable_name(self.prepare_batch), callable_name(self.forward)]
        if self.postprocess is not None:
            names.append(callable_name(self.postprocess))
        return f"map_gpu({', '.join(names)}{self._size_text()})"

    def callables(self) -> dict[str, Any]:
        return {
            "map_gpu prepare_batch": self.prepare_batch,
            "map_gpu forward": self.forward,
            "map_gpu postprocess": self.postprocess,
            "map_gpu place": self.place,
            "map_gpu sort_by": self.sort_by,
        }
