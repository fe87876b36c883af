"""Serializing the plan once per run (dill), and naming what cannot be serialized.

The plan (source, ops and their user callables, the sink's finalizer) is dumped once in the
main process, before any worker starts, and the same bytes go to every worker. dill handles
lambdas, closures and functions defined in ``__main__``; ``recurse=True`` makes it pickle only
the globals a function uses, so a script's functions work under spawn and forkserver, where
the worker's ``__main__`` is not the script.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any

from ..errors import SerializationError
from ..ops import callable_name
from ..plan import Plan

PICKLE_PROTOCOL = 5


def dumps_plan(obj: Any, plan: Plan) -> bytes:
    """Dumps ``obj`` (the plan and the finalizer, or the GPU workers' forwards) with dill.

    Runs in the main process, before any worker starts. When ``obj`` is a :class:`Plan`, or a
    tuple whose first item is one, that is the CPU workers' plan: the callables of ``plan``
    are checked first (:func:`~streamproc.execution.captures.check_plan_captures`), once per
    run, for captured OS resources that pickling would silently copy or reopen, and for the
    GPU workers' model travelling to CPU workers.

    Raises:
        SerializationError: naming the stage and the callable (or the source) that failed, or
            the resource a callable captures.

    Warns:
        ModelShippedWarning: a CPU-side callable captures the model that GPU workers run.
    """
    import dill

    from .captures import check_plan_captures  # main process only: workers never import it

    cpu_plan = obj[0] if isinstance(obj, tuple) and obj and isinstance(obj[0], Plan) else obj
    if isinstance(cpu_plan, Plan):
        check_plan_captures(plan, cpu_plan)
    try:
        return dill.dumps(obj, protocol=PICKLE_PROTOCOL, recurse=True)
    except Exception as exc:
        culprit = _find_unpicklable(plan)
        raise SerializationError(
            f"cannot serialize {culprit or 'the stream'} to send it to the worker processes: "
            f"{type(exc).__name__}: {exc}. Everything a stream uses must be picklable by dill "
            "(define objects at module level, or create them inside the function that uses them)."
        ) from exc


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


def dumps_message(message: Any) -> bytes:
    """Pickles a message: the fast standard pickle, else dill.

    dill is the fallback for what only it can pickle, such as an exception class defined in
    a script's ``__main__`` (the plan carries such classes by value, so the worker's copy is
    not ``__main__.UserError`` for the standard pickle); dill maps it back to the user's class.
    """
    try:
        return _STD_PICKLE + pickle.dumps(message, protocol=PICKLE_PROTOCOL)
    except Exception:
        import dill

        return _DILL_PICKLE + dill.dumps(message, protocol=PICKLE_PROTOCOL, recurse=True)


def loads_message(data: bytes) -> Any:
    """Inverse of :func:`dumps_message`."""
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
    """
    import io

    import dill

    class _Unpickler(dill.Unpickler):  # type: ignore[misc]
        def find_class(self, module: str, name: str) -> Any:
            found = super().find_class(module, name)
            return _create_type_or_main_twin if found is dill._dill._create_type else found

    return _Unpickler(io.BytesIO(data)).load()


def _create_type_or_main_twin(metaclass: Any, *args: Any) -> Any:
    if len(args) == 3 and isinstance(args[2], dict) and args[2].get("__module__") == "__main__":
        name = args[0]
        twin = getattr(sys.modules.get("__main__"), name, None)
        if isinstance(twin, type) and twin.__qualname__ == name and type(twin) is metaclass:
            return twin
    return metaclass(*args)
