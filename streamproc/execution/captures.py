"""What a stream's callables capture, seen before they are pickled for worker processes.

dill pickles an open file by reopening it by name in each worker (mode ``"w"`` truncates it:
lines written by the other processes are lost) and a ``threading.Lock`` as a fresh lock per
worker (it then protects nothing). Neither fails, so :func:`check_plan_captures` refuses such
OS resources before any worker starts, naming the callable, the object and the variable. It
also warns when a CPU-side callable (``prepare_batch``, ``postprocess``, a ``map`` fn) reaches
the model that the GPU workers run: every CPU worker would hold it too (its large tensors are
shared, not pickled: see :mod:`.shared_weights`; the rest still travels, and is built, there).

Runs in the main process, once per run, from :func:`streamproc.execution.serialization.dumps_plan`:
only backends that pickle the plan (multiprocessing) check; the simple and threads backends
run callables in this process, where open files and locks work as usual.

The walk follows what ``dill.dumps(..., recurse=True)`` serializes: a function pickled by
value (a lambda, a closure, a function of ``__main__``) brings its closure cells, defaults and
the globals its code names; a function or class importable by name travels by reference and
is not entered (a library's module-level lock never travels), nor is a module. Other objects
bring what their ``__reduce_ex__`` returns: their ``__dict__``, or what their ``__getstate__``
keeps (a class that drops its file handle when pickled is fine).
"""

from __future__ import annotations

import functools
import io
import pickle
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from .._warnings import stacklevel_outside_streamproc
from ..errors import SerializationError
from ..ops import MapGPU, callable_name
from .resources import resource_kind

if TYPE_CHECKING:
    from ..plan import Plan

#: How many references deep (closure cell, global, attribute, item...) to look from a callable.
CAPTURE_SEARCH_DEPTH = 4
#: The most objects one walk looks at (bounds the cost of a callable that captures a big list).
MAX_OBJECTS_VISITED = 20_000
#: A model that travels to CPU workers is worth a warning from this size (parameters + buffers).
MODEL_WARNING_MIN_BYTES = 1_000_000

#: Packages whose objects hold data, not OS resources worth refusing: not entered.
_DATA_PACKAGES = frozenset({"numpy", "pandas", "pyarrow", "torch"})


class ModelShippedWarning(UserWarning):
    """A CPU-side callable captures the model that the GPU workers run: it travels to every CPU worker."""


@dataclass(frozen=True)
class Capture:
    """An object a callable reaches: ``kind`` (``"an open file"``, ``"a model"``...) and the path to it.

    ``path`` holds steps from ``root`` (the callable's name, or ``"self"`` for an object): a
    variable name (closure cell, global, default, keyword), or ``".attr"`` / ``"[i]"`` from
    the previous step; ``()`` is the root itself.
    """

    kind: str
    value: Any
    path: tuple[str, ...]
    root: str = "self"
    fix: str = ""

    def where(self) -> str:
        """``"variable 'out'"``, ``"variable 'holder', as holder.files[0]"``, ``"as self.f"``; ``""`` for the root."""
        if not self.path:
            return ""
        first = self.path[0]
        if len(self.path) == 1 and first.isidentifier():
            return f"variable {first!r}"
        text = render_path(self.path, self.root)
        return f"variable {first!r}, as {text}" if first.isidentifier() else f"as {text}"


@dataclass
class Captures:
    """What one walk found: OS resources and ``torch.nn.Module``s, in the order met."""

    resources: list[Capture] = field(default_factory=list)
    models: list[Capture] = field(default_factory=list)


def render_path(path: tuple[str, ...], root: str = "self") -> str:
    """``("holder", ".files", "[0]")`` -> ``"holder.files[0]"``; ``("helper", "out")`` -> ``"helper -> out"``
    (the global ``out`` of the function ``helper``); a leading ``".f"`` reads ``root.f``."""
    text = ""
    for step in path:
        if step.startswith((".", "[")):
            text += step if text else f"{root}{step}"
        else:
            text += f" -> {step}" if text else step
    return text


def pickled_by_reference(obj: Any) -> bool:
    """Whether dill pickles this function or class by its importable name (its contents stay behind).

    As dill's ``_locate_function``, but looking in ``sys.modules`` only, never importing.
    """
    module_name = getattr(obj, "__module__", None)
    if module_name in ("__main__", None):
        return False
    target: Any = sys.modules.get(module_name)
    try:
        for part in (getattr(obj, "__qualname__", None) or obj.__name__).split("."):
            target = getattr(target, part)
    except Exception:  # "<locals>", "<lambda>", or gone
        return False
    return target is obj


def find_captures(obj: Any, depth: int = CAPTURE_SEARCH_DEPTH, root: str = "self") -> Captures:
    """The OS resources and ``torch.nn.Module``s that pickling ``obj`` with dill would carry.

    Looks ``depth`` references deep (a method's ``__self__`` or a partial's ``func`` is no
    step deeper), through what dill pickles (see the module docstring). Never enters modules,
    classes, functions importable by name, numpy/pandas/pyarrow/torch objects, or a found
    resource or model. Visits at most ``MAX_OBJECTS_VISITED`` objects. ``root`` names ``obj``
    in the paths.
    """
    found = Captures()
    seen: dict[int, Any] = {}  # id -> object, kept alive so that no id is reused during the walk
    visits = 0
    torch = sys.modules.get("torch")
    atoms = (type(None), bool, int, float, complex, str, bytes, bytearray, range, type, types.ModuleType, types.CodeType)
    containers = (dict, list, tuple, set, frozenset)  # exactly these types: no resource, no model

    def visit(value: Any, path: tuple[str, ...], level: int) -> None:
        nonlocal visits
        visits += 1
        if level < 0 or isinstance(value, atoms) or id(value) in seen:
            return
        seen[id(value)] = value
        resource = None if type(value) in containers else resource_kind(value)
        if resource is not None:
            found.resources.append(Capture(resource[0], value, path, root, resource[1]))
        elif torch is not None and isinstance(value, torch.nn.Module):
            found.models.append(Capture("a model", value, path, root))
        elif (type(value).__module__ or "").split(".")[0] not in _DATA_PACKAGES:
            for child, step, cost in _children(value):
                if visits >= MAX_OBJECTS_VISITED:
                    break  # the rest of a big container is not looked at
                visit(child, path if step is None else (*path, step), level - cost)

    visit(obj, (), depth)
    return found


def _children(value: Any) -> Iterator[tuple[Any, Optional[str], int]]:
    """``(child, step, cost)`` for what pickling ``value`` brings along; cost 0 for no new reference."""
    if isinstance(value, types.FunctionType):
        yield from _function_children(value)
    elif isinstance(value, (types.MethodType, types.BuiltinMethodType, types.MethodWrapperType)):
        owner = value.__self__
        if owner is not None and not isinstance(owner, types.ModuleType):
            yield owner, ".__self__", 0
        if isinstance(value, types.MethodType):
            yield value.__func__, None, 0
    elif isinstance(value, functools.partial):
        yield value.func, None, 0
        for i, arg in enumerate(value.args):
            yield arg, f"args[{i}]", 1
        for name, arg in value.keywords.items():
            yield arg, name, 1
    elif isinstance(value, (staticmethod, classmethod)):
        yield value.__func__, None, 0
    elif isinstance(value, dict):
        for key, item in value.items():
            yield item, f"[{key!r}]", 1
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield item, f"[{i}]", 1
    elif isinstance(value, (set, frozenset)):
        for item in value:
            yield item, "[...]", 1
    else:
        yield from _pickled_state(value)


def _function_children(fn: types.FunctionType) -> Iterator[tuple[Any, Optional[str], int]]:
    if pickled_by_reference(fn):
        return
    code = fn.__code__
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            yield cell.cell_contents, name, 1
        except ValueError:  # an empty cell
            pass
    # dill (recurse=True) pickles the globals named by the code and its nested code objects.
    for name in dict.fromkeys(_code_names(code)):
        if name in fn.__globals__:
            yield fn.__globals__[name], name, 1
    defaults = fn.__defaults__ or ()
    positional = code.co_varnames[: code.co_argcount]
    yield from ((default, name, 1) for name, default in zip(positional[len(positional) - len(defaults):], defaults))
    yield from ((default, name, 1) for name, default in (fn.__kwdefaults__ or {}).items())
    yield from ((attr, f".{name}", 1) for name, attr in vars(fn).items())


def _code_names(code: types.CodeType) -> Iterator[str]:
    """The names a code object and its nested code (comprehensions, inner functions) look up."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def _pickled_state(value: Any) -> Iterator[tuple[Any, Optional[str], int]]:
    """What pickle takes of an object: ``__call__`` of a class pickled by value, then ``__reduce_ex__``'s arguments and state."""
    call = next((vars(klass)["__call__"] for klass in type(value).__mro__ if "__call__" in vars(klass)), None)
    if isinstance(call, types.FunctionType) and not pickled_by_reference(type(value)):
        yield call, None, 0  # the class travels by value with its methods; __call__ runs in the worker
    try:  # protocols 2 to 5 reduce the objects entered here alike (numpy, which differs, is not entered)
        reduced = value.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    except Exception:  # unpicklable: dill will say so, and dumps_plan names the callable
        return
    if not isinstance(reduced, tuple):  # a global name: pickled by reference
        return
    args = reduced[1] if len(reduced) > 1 and isinstance(reduced[1], tuple) else ()
    for i, arg in enumerate(args):
        yield arg, f".__reduce__()[1][{i}]", 1
    state = reduced[2] if len(reduced) > 2 else None
    for part in state if isinstance(state, tuple) and len(state) == 2 else (state,):  # (__dict__, slots)
        if isinstance(part, dict):
            for name, attr in part.items():
                yield attr, f".{name}" if isinstance(name, str) and name.isidentifier() else f"[{name!r}]", 1
        elif part is not None:
            yield part, ".__getstate__()", 1


def _root_name(role: str, value: Any) -> str:
    """How paths name the callable: its ``__name__`` (a function, a method), ``kwargs``, or ``self`` (an object)."""
    if not callable(value):
        return role.split()[-1]  # "map kwargs"
    name = getattr(value, "__name__", None)
    return name if isinstance(value, types.FunctionType | types.MethodType | types.BuiltinMethodType) and name else "self"


def _callables(plan: Plan, cpu_plan: Plan) -> Iterator[tuple[str, Any, str, bool]]:
    """``(label, value, root, runs_in_cpu_workers)`` for each user callable of ``plan``.

    The label reads ``"the map fn 'f' of stage 2 (map(f))"``; a ``map_gpu`` forward that the
    CPU plan replaced runs on GPU workers.
    """
    for stage in plan.stages:
        cpu_op = cpu_plan.stage(stage.index).op
        for role, value in stage.op.callables().items():
            if value is None:
                continue
            name = f" {callable_name(value)!r}" if callable(value) else ""
            split_off = isinstance(cpu_op, MapGPU) and role == "map_gpu forward" and cpu_op.forward is not value
            yield f"the {role}{name} of {stage.name}", value, _root_name(role, value), not split_off


def check_plan_captures(plan: Plan, cpu_plan: Plan) -> None:
    """Refuses OS resources captured by the plan's callables; warns when a model goes to CPU workers.

    Runs in the main process before any worker starts. ``plan`` is the whole plan and
    ``cpu_plan`` the CPU workers' part (after :func:`streamproc.execution.split.split_plan`;
    ``plan`` itself when ``forward`` runs in the CPU workers). Walks each callable once.

    Raises:
        SerializationError: a callable captures an open file, a lock, a socket, a database
            connection, a subprocess or a similar resource (names the callable, the object,
            the variable and the fix).

    Warns:
        ModelShippedWarning: a CPU-side callable reaches a model of at least
            ``MODEL_WARNING_MIN_BYTES`` that GPU workers run (one warning per run).
    """
    walked = [
        (label, value, in_cpu, find_captures(value, root=root)) for label, value, root, in_cpu in _callables(plan, cpu_plan)
    ]
    found = [(label, capture) for label, _, _, captures in walked for capture in captures.resources]
    if found:
        label, capture = found[0]
        where = f" ({capture.where()})" if capture.path else ""
        more = f" (and {len(found) - 1} more such capture(s))" if len(found) > 1 else ""
        raise SerializationError(
            f"{label} captures {capture.kind} {_describe(capture.value)}{where}{more}, which cannot be sent to "
            f"worker processes: {capture.fix}. The simple backend runs callables in this process, where it works."
        )
    forwards = [value for _, value, in_cpu, _ in walked if not in_cpu]
    cpu_side = [(label, captures) for label, _, in_cpu, captures in walked if in_cpu and captures.models]
    if forwards and cpu_side:
        _warn_models_shipped(cpu_side, forwards)


def _describe(value: Any) -> str:
    """A short repr; a file's says its name and mode (``<_io.TextIOWrapper name='out.txt' mode='w'>``)."""
    if isinstance(value, io.IOBase) and hasattr(value, "name"):
        mode = f" mode={value.mode!r}" if hasattr(value, "mode") else ""
        return f"<{type(value).__module__}.{type(value).__qualname__} name={value.name!r}{mode}>"
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 160 else f"{text[:156]}...>"


def _warn_models_shipped(cpu_side: list[tuple[str, Captures]], forwards: list[Any]) -> None:
    """Warns about the CPU-side models that share weights with a forward run by GPU workers."""
    from ..gpu import find_modules

    gpu_tensors = {id(t) for forward in forwards for module in find_modules(forward) for t in _tensors(module)}
    lines = []
    for label, captures in cpu_side:
        for capture in captures.models:
            tensors = list(_tensors(capture.value))
            size = sum(t.numel() * t.element_size() for t in tensors)
            if size >= MODEL_WARNING_MIN_BYTES and any(id(t) in gpu_tensors for t in tensors):
                where = f", {capture.where()}" if capture.path else ""
                lines.append(
                    f"{label} captures the model {type(capture.value).__name__} ({size / 1e6:.1f} MB of parameters "
                    f"and buffers{where}) that the GPU workers run, so every CPU worker loads it too"
                )
    if lines:
        advice = (
            "Capture only what the CPU side needs (e.g. `tokenizer = model.tokenizer` outside the function, "
            "then use `tokenizer` inside it), or build it in a per-worker class."
        )
        warnings.warn(ModelShippedWarning("; ".join(lines) + ". " + advice), stacklevel=stacklevel_outside_streamproc())


def _tensors(module: Any) -> Iterator[Any]:
    yield from module.parameters()
    yield from module.buffers()
