"""Running ops under ``on_error="skip" | "dead_letter"``: drop only the records that fail alone.

Where it runs: where the task runs (the main process with the simple backend, a worker
thread, a CPU worker); ``forward`` goes through the stage's forward runner, so under the
multiprocessing backend a retried sub-batch is a new batch sent to a GPU worker.

Zero cost while nothing fails: every op first runs a whole chunk (or batch) on its usual fast
path, and only when that raises is the chunk redone with isolation:

* ``map``/``filter``/``flatten``: the failing chunk is run again record by record, each under
  its own ``try``; the records that raise are dropped and recorded. So the records of a
  failing chunk before the bad one run twice (it matters only for side effects).
* batch ops (``map_batches``; ``map_gpu``'s ``prepare_batch``, ``forward`` and
  ``postprocess``): the failing batch is split in halves and each half retried, recursively,
  so only a batch of one record that still fails is dropped: ``ceil(log2(n))`` levels and
  about ``2 log2(n)`` extra calls per bad record in a batch of ``n``. Batches that never failed
  keep their composition (their outputs are bit-identical); the survivors of a split batch
  ran in smaller batches (equal within float tolerance). A CUDA out-of-memory error is an
  ``Exception`` like any other, so a batch too large for the device degrades the same way.

Record rows (``ErrorPolicy.record(..., row)``) count the stage's input records in the task.
"""

from __future__ import annotations

import collections
import itertools
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, Union

from ..errors import RemoteTraceback
from .error_policy import ErrorPolicy, is_record_failure

if TYPE_CHECKING:
    from .context import ForwardRunner

T = TypeVar("T")


class _StepFailed(Exception):
    """Internal: ``error`` was raised by the step named ``stage`` (never leaves this module).

    The traceback is formatted at once and dropped from ``error``: its frames hold the failed
    batch (on the device, for a CUDA out-of-memory error), which must be freed before the
    halves are retried.
    """

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(stage, error)
        self.stage = stage
        self.error = error
        self.traceback = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        error.__traceback__ = None


def _run_step(stage: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``; a record failure comes out as :class:`_StepFailed` naming ``stage``."""
    try:
        return fn(*args)
    except Exception as exc:
        if not is_record_failure(exc):
            raise
        raise _StepFailed(stage, exc) from None


# -- map, filter, flatten: one record at a time -----------------------------------------------


def _each_record(
    chunks: Iterator[list[Any]],
    fast: Callable[[list[Any]], list[Any]],
    one: Callable[[Any, list[Any]], None],
    policy: ErrorPolicy,
    stage: str,
) -> Iterator[list[Any]]:
    offset = 0
    for chunk in chunks:
        try:
            out = fast(chunk)
        except Exception as exc:
            if not is_record_failure(exc):
                raise
            out = []
            for row, record in enumerate(chunk, start=offset):
                try:
                    one(record, out)
                except Exception as record_exc:
                    if not is_record_failure(record_exc):
                        raise
                    policy.record(stage, record_exc, record, row)
        offset += len(chunk)
        yield out


def map_records(chunks: Iterator[list[Any]], fn: Callable[[Any], Any], policy: ErrorPolicy, stage: str) -> Iterator[list[Any]]:
    """``map`` under the policy: a record whose ``fn`` raises is dropped and recorded."""
    return _each_record(chunks, lambda chunk: list(map(fn, chunk)), lambda r, out: out.append(fn(r)), policy, stage)


def filter_records(
    chunks: Iterator[list[Any]], pred: Callable[[Any], Any], policy: ErrorPolicy, stage: str
) -> Iterator[list[Any]]:
    """``filter`` under the policy: a record whose predicate raises is dropped and recorded."""

    def one(record: Any, out: list[Any]) -> None:
        if pred(record):
            out.append(record)

    return _each_record(chunks, lambda chunk: list(filter(pred, chunk)), one, policy, stage)


def flatten_records(chunks: Iterator[list[Any]], policy: ErrorPolicy, stage: str) -> Iterator[list[Any]]:
    """``flatten`` under the policy: a record that cannot be iterated (or whose iteration raises)
    is dropped whole and recorded; its items yielded before the error are dropped with it."""
    return _each_record(
        chunks, lambda chunk: list(itertools.chain.from_iterable(chunk)), lambda r, out: out.extend(list(r)), policy, stage
    )


# -- batch ops: split in halves ---------------------------------------------------------------


def bisect(
    run: Callable[[list[Any]], T], records: list[Any], offset: int, failure: _StepFailed, policy: ErrorPolicy
) -> Iterator[tuple[int, list[Any], T]]:
    """Retries ``run`` on the halves of ``records`` (which failed with ``failure``), recursively.

    Yields ``(offset, part, run(part))`` for the parts that succeed, in record order; a part
    of one record that fails is recorded with the step and error of its own last failure.
    ``run`` raises :class:`_StepFailed` for a record failure (see :func:`_run_step`).
    """
    if len(records) <= 1:
        for record in records:
            policy.record(failure.stage, failure.error, record, offset, failure.traceback)
        return
    middle = len(records) // 2
    for part, part_offset in ((records[:middle], offset), (records[middle:], offset + middle)):
        try:
            result = run(part)
        except _StepFailed as part_failure:
            yield from bisect(run, part, part_offset, part_failure, policy)
            continue
        yield part_offset, part, result


def _flat(parts: Iterable[tuple[int, list[Any], list[Any]]]) -> list[Any]:
    return [record for _, _, outputs in parts for record in outputs]


def map_batches_isolated(
    batches: Iterator[list[Any]], fn: Callable[[list[Any]], Iterable[Any]], policy: ErrorPolicy, stage: str
) -> Iterator[list[Any]]:
    """``map_batches`` under the policy: a failing batch is bisected (see the module docstring)."""

    def run(part: list[Any]) -> list[Any]:
        return _run_step(stage, lambda p: list(fn(p)), part)

    offset = 0
    for batch in batches:
        try:
            yield run(batch)
        except _StepFailed as failure:
            yield _flat(bisect(run, batch, offset, failure, policy))
        offset += len(batch)


# -- map_gpu: prepare_batch, forward, postprocess ---------------------------------------------


def _forward_one(runner: ForwardRunner, records: list[Any], prepared: Any) -> Any:
    """The outputs of one batch's forward, through the stage's runner (a GPU worker or here)."""
    outputs = runner.run(iter([(records, prepared)]))
    try:
        return next(outputs)[1]
    finally:
        close = getattr(outputs, "close", None)
        if close is not None:
            close()


class MapGPUSteps:
    """The three steps of one ``map_gpu`` stage, each named as its errors are (``stage, forward``)."""

    def __init__(
        self,
        stage: str,
        prepare_batch: Callable[[list[Any]], Any],
        runner: ForwardRunner,
        postprocess: Callable[[list[Any], Any], Iterable[Any]],
    ) -> None:
        self.prepare_batch = prepare_batch
        self.runner = runner
        self.postprocess = postprocess
        self.prepare_name = f"{stage}, prepare_batch"
        self.forward_name = f"{stage}, forward"
        self.postprocess_name = f"{stage}, postprocess"

    def prepare(self, records: list[Any]) -> Any:
        return _run_step(self.prepare_name, self.prepare_batch, records)

    def finish(self, records: list[Any], outputs: Any) -> list[Any]:
        return _run_step(self.postprocess_name, lambda r, o: list(self.postprocess(r, o)), records, outputs)

    def whole(self, records: list[Any]) -> list[Any]:
        """A sub-batch through all three steps (what a split batch's half runs)."""
        prepared = self.prepare(records)
        outputs = _run_step(self.forward_name, _forward_one, self.runner, records, prepared)
        return self.finish(records, outputs)


_Prepared = tuple[int, list[Any], Any]


def map_gpu_isolated(batches: Iterator[list[Any]], steps: MapGPUSteps, policy: ErrorPolicy) -> Iterator[list[Any]]:
    """``map_gpu`` under the policy: a batch failing at any step is bisected through all three.

    The fast path keeps the runner's pipelining (several batches in flight to the GPU
    workers). When ``forward`` fails, the pipelined run is closed (the answers to the batches
    still in flight are dropped), the failed batch is retried in halves, and the batches that
    were in flight are sent again in order. A failure that cannot be pinned on one batch (it
    came while several were in flight, e.g. a batch that cannot be pickled) first retries the
    oldest one whole, so a batch that never failed keeps its composition.
    """

    def prepared() -> Iterator[_Prepared]:
        offset = 0
        for records in batches:
            try:
                yield offset, records, steps.prepare(records)
            except _StepFailed as failure:
                # The halves that prepare go to forward as batches of their own.
                yield from bisect(steps.prepare, records, offset, failure, policy)
            offset += len(records)

    for offset, records, outcome in _forward_replaying(steps, prepared()):
        if isinstance(outcome, _StepFailed):
            yield _flat(bisect(steps.whole, records, offset, outcome, policy))
            continue
        try:
            yield steps.finish(records, outcome)
        except _StepFailed as failure:
            yield _flat(bisect(steps.whole, records, offset, failure, policy))


def _forward_replaying(
    steps: MapGPUSteps, items: Iterator[_Prepared]
) -> Iterator[tuple[int, list[Any], Union[Any, _StepFailed]]]:
    """``(offset, records, outputs)`` per prepared batch, in order; a batch whose forward failed
    comes with the :class:`_StepFailed` instead of outputs (the caller bisects it)."""
    in_flight: collections.deque[_Prepared] = collections.deque()  # sent, not answered yet
    upstream_error: list[BaseException] = []

    def feed(replay: list[_Prepared]) -> Iterator[tuple[list[Any], Any]]:
        source = itertools.chain(replay, items)
        while True:
            try:
                item = next(source)
            except StopIteration:
                return
            except Exception as exc:  # an upstream stage's failure: not forward's, stop the task
                upstream_error.append(exc)
                raise
            in_flight.append(item)
            yield item[1], item[2]

    replay: list[_Prepared] = []
    while True:
        outputs = steps.runner.run(feed(replay))
        try:
            for _, result in outputs:
                offset, records, _ = in_flight.popleft()
                yield offset, records, result
            return
        except Exception as exc:
            if (upstream_error and exc is upstream_error[0]) or not is_record_failure(exc) or not in_flight:
                raise
            failure = _StepFailed(steps.forward_name, exc)
            error = exc
        finally:
            close = getattr(outputs, "close", None)
            if close is not None:
                close()
        offset, records, batch = in_flight.popleft()
        replay = list(in_flight)
        in_flight.clear()
        # An answer from a GPU worker is the oldest batch's (answers come in order); an error
        # raised here while several batches were in flight may be a later one's (pickling it).
        if replay and not isinstance(error.__cause__, RemoteTraceback):  # retry it whole first
            try:
                yield offset, records, _run_step(steps.forward_name, _forward_one, steps.runner, records, batch)
                continue
            except _StepFailed as own_failure:
                failure = own_failure
        yield offset, records, failure
