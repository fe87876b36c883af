"""Serializing the plan once per run (dill), and naming what cannot be serialized.

The plan (source, ops and their user callables, the sink's finalizer) is dumped once in the
main process, before any worker starts, and the same bytes go to every worker. dill handles
lambdas, closures and functions defined in ``__main__``; ``recurse=True`` makes it pickle only
the globals a function uses, so a script's functions work under spawn and forkserver, where
the worker's ``__main__`` is not the script. With a
:class:`~streamproc.execution.shared_weights.WeightShipper`, the large tensors of the models
met travel beside the plan, once (see NOTE [ streamproc weights shipping ]).
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
from typing import TYPE_CHECKING, Any, Optional

from ..errors import SerializationError
from ..ops import callable_name
from ..plan import Plan
from .tensor_pickling import PROTOCOL as PICKLE_PROTOCOL  # one protocol for plans and messages
from .tensor_pickling import dumps_with_prefix

if TYPE_CHECKING:
    from .shared_weights import WeightShipper


def dumps_worker_plan(
    plan: Plan, cpu_plan: Plan, *parts: Any, weights: Optional[WeightShipper] = None, inherit: bool = False
) -> bytes:
    """Dumps ``(cpu_plan, *parts)``, the CPU workers' half of ``plan``, after checking its captures.

    Every backend that sends a plan to other processes calls this once per run, in the main
    process, before any worker starts: the callables are checked first
    (:func:`~streamproc.execution.captures.check_plan_captures`) for captured OS resources that
    pickling would silently copy or reopen, and for the GPU workers' model travelling to CPU
    workers. ``weights`` and ``inherit``: see :func:`dumps_plan`.

    Raises:
        SerializationError: naming the resource a callable captures, or what cannot be pickled.

    Warns:
        ModelShippedWarning: a CPU-side callable captures the model that GPU workers run.
    """
    from .captures import check_plan_captures  # main process only: workers never import it

    check_plan_captures(plan, cpu_plan)
    return dumps_plan((cpu_plan, *parts), plan, weights, inherit)


def dumps_plan(obj: Any, plan: Plan, weights: Optional[WeightShipper] = None, inherit: bool = False) -> bytes:
    """Dumps ``obj`` (part of ``plan``: its CPU half, or the GPU workers' forwards) with dill.

    Main process. With ``weights``, the large tensors of the models met are replaced by
    references that :func:`dill_loads` resolves: inherited (``inherit``: every process that
    loads these bytes is forked from this one afterwards) or from a file written once (see
    NOTE [ streamproc weights shipping ] in :mod:`.shared_weights`).

    Raises:
        SerializationError: naming the stage and the callable (or the source) that failed.
    """
    import dill

    try:
        if weights is None:
            return dill.dumps(obj, protocol=PICKLE_PROTOCOL, recurse=True)
        return _dumps_shipping_weights(obj, weights, inherit)
    except Exception as exc:
        culprit = _find_unpicklable(plan)
        raise SerializationError(
            f"cannot serialize {culprit or 'the stream'} to send it to the worker processes: "
            f"{type(exc).__name__}: {exc}. Everything a stream uses must be picklable by dill "
            "(define objects at module level, or create them inside the function that uses them)."
        ) from exc


def _dumps_shipping_weights(obj: Any, weights: WeightShipper, inherit: bool) -> bytes:
    import io

    import dill

    hook = weights.pickling(inherit)

    class _Pickler(dill.Pickler):  # type: ignore[misc]
        def persistent_id(self, value: Any) -> Any:
            return hook.persistent_id(value)

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=PICKLE_PROTOCOL, recurse=True).dump(obj)
    hook.finish()  # the file is written only for a plan that pickled
    return buffer.getvalue()


def _find_unpicklable(plan: Plan) -> str | None:
    import dill

    def fails(value: Any) -> bool:
        try:
            dill.dumps(value, protocol=PICKLE_PROTOCOL, recurse=True)
        except Exception:
            return True
        return False

    if fails(plan.source):
        return f"the source {plan.source.describe()}"
    for stage in plan.stages:
        for role, value in stage.op.callables().items():
            if value is not None and fails(value):
                return f"the {role} {callable_name(value)!r} of {stage.name}"
    return None


_STD_PICKLE = b"P"
_DILL_PICKLE = b"D"

#: The recursion limit while a deeply nested message is pickled. CPython's pickle counts about
#: two units of it per level of nesting of a list or dict, so messages nested up to about
#: 40,000 levels deep pickle (20,000 for class instances); a deeper one raises SerializationError.
DEEP_MESSAGE_RECURSION_LIMIT = 100_000
#: C stack of the thread that pickles a deeply nested message. The standard pickle recurses in
#: C: under the limit above it used up to 16-32 MiB (objects with a ``__reduce__``; Python
#: 3.11), where a thread's usual 8 MiB (less with some libcs) would overflow into a segfault.
#: Reserved virtual memory: only the pages the message reaches are touched.
DEEP_MESSAGE_STACK_BYTES = 128 * 2**20
DEEP_MESSAGE_THREAD_NAME = "streamproc-deep-pickle"

# Held while any message is pickled: the recursion limit is process-wide, and a standard pickle
# running in another thread while it is raised could recurse past its own thread's C stack.
_message_lock = threading.RLock()
# The recursion limit before ``_dumps_deep`` raised it, restored in a child forked meanwhile.
_limit_before_raise: Optional[int] = None


def dumps_message(message: Any) -> bytes:
    """Pickles a message: the fast standard pickle, else dill.

    Runs in every process and thread that sends messages (feeders, workers, GPU peer senders).
    dill is the fallback for what only it can pickle, such as an exception class defined in
    a script's ``__main__`` (the plan carries such classes by value, so the worker's copy is
    not ``__main__.UserError`` for the standard pickle); dill maps it back to the user's class.

    A message nested deeper than the interpreter's recursion limit allows (a record 5,000
    lists deep) is pickled again under :data:`DEEP_MESSAGE_RECURSION_LIMIT`, in a thread with a
    :data:`DEEP_MESSAGE_STACK_BYTES` C stack: the simple backend never pickles records, so
    without this the backends would disagree on which records work.

    Raises:
        SerializationError: the message is nested too deeply even for that.
        Exception: whatever dill raises for an object that neither pickle can serialize.
    """
    with _message_lock:
        try:
            return _dumps(message)
        except RecursionError:
            return _dumps_deep(message)


def _dumps(message: Any) -> bytes:
    try:
        return dumps_with_prefix(_STD_PICKLE, message)
    except RecursionError:
        raise
    except Exception:
        import dill

        return _DILL_PICKLE + dill.dumps(message, protocol=PICKLE_PROTOCOL, recurse=True)


def _dumps_deep(message: Any) -> bytes:
    """:func:`_dumps` under a raised recursion limit, on a large C stack (the caller holds the lock)."""
    global _limit_before_raise
    outcome: dict[str, Any] = {}

    def pickle_it() -> None:
        try:
            outcome["data"] = _dumps(message)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    _limit_before_raise = sys.getrecursionlimit()
    sys.setrecursionlimit(max(_limit_before_raise, DEEP_MESSAGE_RECURSION_LIMIT))
    try:
        stack_before = threading.stack_size(DEEP_MESSAGE_STACK_BYTES)
        try:
            thread = threading.Thread(target=pickle_it, name=DEEP_MESSAGE_THREAD_NAME, daemon=True)
            thread.start()
        finally:
            threading.stack_size(stack_before)
        # No deadline: the thread only runs this process's own pickling, which the caller
        # would otherwise run inline; it waits on nothing that could die.
        thread.join()
    finally:
        sys.setrecursionlimit(_limit_before_raise)
        _limit_before_raise = None
    error = outcome.get("error")
    if isinstance(error, RecursionError):
        raise SerializationError(
            f"a message nested too deeply to pickle even with a recursion limit of {DEEP_MESSAGE_RECURSION_LIMIT} "
            "(a record holding lists or dicts tens of thousands of levels deep?): flatten such records "
            "before they leave the process"
        ) from error
    if error is not None:
        raise error
    data: bytes = outcome["data"]
    return data


def _reset_after_fork_in_child() -> None:
    # A fork while another thread held the lock, or had raised the limit, would leave the child
    # with a lock nobody releases, or the raised limit for good.
    global _message_lock, _limit_before_raise
    _message_lock = threading.RLock()
    if _limit_before_raise is not None:
        sys.setrecursionlimit(_limit_before_raise)
        _limit_before_raise = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork_in_child)


def loads_message(data: bytes) -> Any:
    """Inverse of :func:`dumps_message`.

    Needs no raised recursion limit however deep the message: unpickling is iterative, in the
    C and in the Python unpickler (a message 100,000 lists deep loads under the default limit).
    """
    if data[:1] == _STD_PICKLE:
        return pickle.loads(memoryview(data)[1:])
    return dill_loads(memoryview(data)[1:])


def dill_loads(data: Any) -> Any:
    """``dill.loads``, except that a class of ``__main__`` becomes this process's own class of that name.

    dill sends the classes of a script's ``__main__`` by value, and loading one creates a copy:
    a record of class ``Doc`` sent by the main process (by reference) would then fail
    ``isinstance(doc, Doc)`` in the user's function, and outputs would not compare equal to
    the simple backend's. Where the loading process has the class (fork; spawn and forkserver
    re-import the script), it is used instead; otherwise (a notebook, a class defined under
    ``if __name__ == "__main__":``) the copy is kept, as before.

    Model weights that :func:`dumps_plan` shipped by reference are resolved here (in the
    worker), by :func:`~streamproc.execution.shared_weights.resolve_weight`.
    """
    import io

    import dill

    from .shared_weights import resolve_weight

    memo: dict[Any, Any] = {}

    class _Unpickler(dill.Unpickler):  # type: ignore[misc]
        def find_class(self, module: str, name: str) -> Any:
            found = super().find_class(module, name)
            return _create_type_or_main_twin if found is dill._dill._create_type else found

        def persistent_load(self, pid: Any) -> Any:
            return resolve_weight(pid, memo)

    return _Unpickler(io.BytesIO(data)).load()


def _create_type_or_main_twin(metaclass: Any, *args: Any) -> Any:
    if len(args) == 3 and isinstance(args[2], dict) and args[2].get("__module__") == "__main__":
        name = args[0]
        twin = getattr(sys.modules.get("__main__"), name, None)
        if isinstance(twin, type) and twin.__qualname__ == name and type(twin) is metaclass:
            return twin
    return metaclass(*args)
