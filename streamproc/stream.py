"""Stream: the immutable, lazy builder users chain ops on. It executes nothing itself.

Every op returns a new Stream; sinks (iteration, ``to_list``, ``to_pandas``,
``write_parquet``, ``write_jsonl``) build a :class:`~streamproc.plan.Plan` and hand it to the
backend chosen by ``set_processing``. All methods here run in the main process; the docstring
of each op says where its callables run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

from .batching import BatchBy, BatchSize, BatchSizeLike, validate_batch_by
from .execution.sorting import SortBy, validate_sort_by
from .io.base import Source
from .io.limit import LimitSource, check_count
from .ops import Filter, Flatten, Map, MapBatches, MapGPU, Op, map_gpu_kwargs, per_worker
from .options import ProcessingOptions
from .plan import Plan, build_plan
from .stream_outputs import StreamOutputs


def _check_callable(value: Any, method: str, param: str) -> None:
    if not callable(value):
        raise TypeError(f"{method}(): {param} must be callable, got {type(value).__name__}: {value!r:.60}")


class Stream(StreamOutputs):
    """A lazy sequence of records: a source, ops, and how to run them.

    >>> import streamproc as sp
    >>> sp.from_iterable(range(5)).map(lambda x: x * 10).filter(lambda x: x > 10).to_list()
    [20, 30, 40]

    Building a stream reads nothing; each sink runs it again from the source (a generator
    source can therefore be run only once).
    """

    __slots__ = ("_ops", "_options", "_source")

    def __init__(self, source: Source, ops: tuple[Op, ...] = (), options: Optional[ProcessingOptions] = None) -> None:
        self._source = source
        self._ops = ops
        self._options = options or ProcessingOptions()

    # -- read-only views --------------------------------------------------------------------
    @property
    def source(self) -> Source:
        return self._source

    @property
    def ops(self) -> tuple[Op, ...]:
        return self._ops

    @property
    def options(self) -> ProcessingOptions:
        return self._options

    def _next_stage(self) -> str:
        """The name of the stage the next op will be, for build-time errors (``"stage 2"``)."""
        return f"stage {len(self._ops) + 1}"

    def _with_op(self, op: Op) -> Stream:
        return Stream(self._source, (*self._ops, op), self._options)

    # -- ops ------------------------------------------------------------------------------------
    def map(
        self, fn: Callable[..., Any], kwargs: Optional[dict[str, Any]] = None, fn_kwargs: Optional[dict[str, Any]] = None
    ) -> Stream:
        """Applies ``fn(record, **kwargs)`` to each record (CPU worker, or main process with simple).

        ``fn`` may be a class with a ``__call__`` (per-worker state: a tokenizer, a connection):
        it is constructed once per worker, where the op runs (``fn(**fn_kwargs)``: once per CPU
        worker process, per worker thread, or once in the main process with the simple
        backend), and the instance is called like the function, ``instance(record, **kwargs)``.
        A class without ``__call__`` (``str``, a record dataclass) is called per record as any
        callable. ``fn_kwargs`` without such a class raises ``TypeError``.

        >>> import streamproc as sp
        >>> sp.from_iterable([1, 2]).map(pow, kwargs={"exp": 2}).to_list()
        [1, 4]
        """
        _check_callable(fn, "map", "fn")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"map(): kwargs must be a dict or None, got {type(kwargs).__name__}")
        fn = per_worker(fn, fn_kwargs, "map", "fn", self._next_stage())
        return self._with_op(Map(fn, dict(kwargs) if kwargs else None))

    def filter(self, pred: Callable[[Any], Any]) -> Stream:
        """Keeps the records for which ``pred(record)`` is truthy (CPU worker).

        >>> import streamproc as sp
        >>> sp.from_iterable(["a", "", "b"]).filter(bool).to_list()
        ['a', 'b']
        """
        _check_callable(pred, "filter", "pred")
        return self._with_op(Filter(pred))

    def flatten(self) -> Stream:
        """Replaces each record by its items (CPU worker); a record must be iterable.

        >>> import streamproc as sp
        >>> sp.from_iterable([[1, 2], [], [3]]).flatten().to_list()
        [1, 2, 3]
        """
        return self._with_op(Flatten())

    def map_batches(
        self,
        fn: Callable[[list[Any]], Iterable[Any]],
        batch_size: Optional[BatchSizeLike] = None,
        batch_by: BatchBy = None,
        fn_kwargs: Optional[dict[str, Any]] = None,
        sort_by: SortBy = None,
    ) -> Stream:
        """Applies ``fn(list_of_records) -> iterable_of_records`` to batches (CPU worker).

        As with :meth:`map`, ``fn`` may be a class with a ``__call__``, constructed once per
        worker with ``fn_kwargs`` and then called per batch.

        ``fn`` may return more or fewer records than it received. Batches never span two tasks
        (see ``set_processing(task_size=...)``), so the last batch of a task may be smaller.
        Without ``batch_size`` the ``set_processing`` default applies (128 records).
        ``sort_by`` (a field or ``record -> key``) batches each task's records in ascending key
        order, outputs back in input order; ``fn`` must then return one record per input.

        >>> import streamproc as sp
        >>> sp.from_iterable(range(5)).map_batches(lambda b: [sum(b)], batch_size=2).to_list()
        [1, 5, 4]
        """
        _check_callable(fn, "map_batches", "fn")
        fn = per_worker(fn, fn_kwargs, "map_batches", "fn", self._next_stage())
        size = None if batch_size is None else BatchSize.parse(batch_size)
        by = validate_batch_by(batch_by)
        return self._with_op(MapBatches(fn, batch_size=size, batch_by=by, sort_by=validate_sort_by(sort_by, "map_batches")))

    def map_gpu(
        self,
        prepare_batch: Callable[[list[Any]], Any],
        forward: Callable[[Any], Any],
        postprocess: Optional[Callable[[list[Any], Any], Iterable[Any]]] = None,
        batch_size: Optional[BatchSizeLike] = None,
        batch_by: BatchBy = None,
        fn_kwargs: Optional[dict[str, dict[str, Any]]] = None,
        place: Optional[Callable[[Any, list[Any]], Any]] = None,
        sort_by: SortBy = None,
    ) -> Stream:
        """A deep-learning stage: batch, prepare on CPU, ``forward`` on a device, postprocess on CPU.

        ``prepare_batch(records) -> batch`` runs on a CPU worker and returns CPU tensors (any
        nesting of dict/list/tuple of tensors or numpy arrays). The engine moves the batch to
        the device; ``forward(batch) -> outputs`` runs under ``torch.inference_mode()`` (and
        autocast when ``set_processing(autocast=...)`` asks) on a GPU worker, or in-process when
        there is none. Outputs return to the CPU, where ``postprocess(records, outputs) ->
        records`` runs; by default each record is replaced by its row of the outputs (numpy).

        ``torch.nn.Module``s reachable from ``forward`` (bound method, closure, globals it names,
        attributes of a callable object) are moved to the device once, before the first batch.

        Each of the three may be a class with a ``__call__``, constructed once per worker where
        it runs: ``prepare_batch`` and ``postprocess`` once per CPU worker (or thread, or the
        main process with simple), ``forward`` once per process that runs forward (each GPU
        worker, else the process or, with threads, once shared by the threads), before its
        modules are moved to the device. ``fn_kwargs`` is a dict *by role* of constructor
        kwargs, e.g. ``fn_kwargs={"forward": {"model_name": "bert-base"}}``, so that it reads
        the same when several of the three are classes.
        ``place(module, devices)`` replaces the engine's placement of each model on the forward
        process's devices (a device group: model parallel; see :mod:`streamproc.gpu.placement`).
        ``sort_by``: as for :meth:`map_batches` (e.g. the token count, so padding wastes little).

        >>> import streamproc as sp, torch
        >>> sp.from_iterable([1.0, 2.0]).map_gpu(torch.tensor, lambda t: t * 2).to_list()
        [2.0, 4.0]
        """
        _check_callable(prepare_batch, "map_gpu", "prepare_batch")
        _check_callable(forward, "map_gpu", "forward")
        for param, value in (("postprocess", postprocess), ("place", place)):
            if value is not None:
                _check_callable(value, "map_gpu", param)
        by_role = map_gpu_kwargs(fn_kwargs, {"prepare_batch": prepare_batch, "forward": forward, "postprocess": postprocess})
        stage = self._next_stage()
        prepare_batch = per_worker(prepare_batch, by_role["prepare_batch"], "map_gpu", "prepare_batch", stage)
        forward = per_worker(forward, by_role["forward"], "map_gpu", "forward", stage)
        if postprocess is not None:
            postprocess = per_worker(postprocess, by_role["postprocess"], "map_gpu", "postprocess", stage)
        size = None if batch_size is None else BatchSize.parse(batch_size)
        by, key = validate_batch_by(batch_by), validate_sort_by(sort_by, "map_gpu")
        op = MapGPU(prepare_batch, forward, postprocess, batch_size=size, batch_by=by, place=place, sort_by=key)
        return self._with_op(op)

    def set_processing(self, **options: Any) -> Stream:
        """Returns this stream with processing options changed (validated now).

        Options: ``backend`` ("simple", "threads", "multiprocessing"), ``num_cpu_workers``,
        ``num_gpu_workers``, ``gpu_worker_devices``, ``deterministic``, ``batch_size``,
        ``batch_by``, ``show_progress``, ``autocast``, ``process_start_method``, ``task_size``,
        ``torch_threads`` (torch's intra-op threads while ``forward`` runs, in every backend;
        default 1 when deterministic, so every backend computes the same bits). Options not
        named keep their current value. Checks that depend on the machine (worker counts far
        above its CPUs, devices that are not there) are the backend's, when the stream runs.

        Raises:
            ValueError: an invalid value, naming the option and what it accepts.
            TypeError: an unknown option.
        """
        source = self._source
        if isinstance(source, LimitSource):  # options set after limit(n) apply before it too
            source = source.with_processing(**options)
        return Stream(source, self._ops, self._options.updated(**options))

    # -- execution --------------------------------------------------------------------------
    def plan(self) -> Plan:
        """The plan a sink would run now (defaults resolved)."""
        return build_plan(self)

    def explain(self) -> str:
        """The plan as text: stages and where each runs, batch and task sizes, workers, devices,
        start methods, and each CPU worker's dispatch cycle to the GPU workers (main process).

        Defaults are resolved as the backend would resolve them; nothing is started and no
        record is read. See :func:`streamproc.explain.explain` for an example.
        """
        from .explain import explain

        return explain(self)

    # -- limit (the sinks are in stream_outputs.py) ------------------------------------------
    def limit(self, n: int) -> Stream:
        """Keeps the first ``n`` records (lazy); later ops see only them.

        The ops before the limit run as a run of their own, whose records the main process
        feeds to the ops after it: once ``n`` records are out, that run stops reading the
        source and its workers stop. Options set before ``limit`` apply to the ops before it;
        options set after apply to all (see NOTE [ streamproc limit ] in ``io/limit.py``).

        >>> import streamproc as sp
        >>> sp.from_iterable(range(100)).map(lambda x: x * 2).limit(3).map(str).to_list()
        ['0', '2', '4']

        With ``deterministic=True`` (the default) these are the first ``n`` records of the
        simple backend's order; with ``deterministic=False``, some ``n`` records. A stream
        with fewer than ``n`` records keeps them all; ``limit(0)`` reads nothing.

        Raises:
            TypeError: ``n`` is not an int. ValueError: ``n`` is negative.
        """
        n = check_count(n, "limit")
        return Stream(LimitSource(self, n), (), self._options)

    def __repr__(self) -> str:
        lines = [f"Stream({self._source.describe()}"]
        lines += [f"  .{op.describe()}" for op in self._ops]
        changed = self._options.changed_fields()
        if changed:
            opts = ", ".join(f"{k}={str(v) if k == 'batch_size' else v!r}" for k, v in changed.items())
            lines.append(f"  .set_processing({opts})")
        return "\n".join(lines) + ")"
