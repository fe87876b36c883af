"""Finding the ``torch.nn.Module``s that a ``forward`` callable uses.

The modules found are moved to the worker's device once, at start-up (see
:class:`streamproc.gpu.forward.DeviceForward`), so that weights never travel per batch. Runs in
the process that owns the device. torch is imported inside the function only.
"""

from __future__ import annotations

import types
from typing import Any

#: How deep to look through closures, attributes and containers for ``torch.nn.Module``s.
MODULE_SEARCH_DEPTH = 3


def find_modules(obj: Any, depth: int = MODULE_SEARCH_DEPTH) -> list[Any]:
    """Finds the ``torch.nn.Module``s reachable from a callable.

    Looks at the object itself, a bound method's ``__self__``, a function's closure cells and
    the globals its code names, ``functools.partial`` arguments, and the attributes of
    callable objects, ``depth`` levels deep.
    """
    import functools

    import torch

    found: dict[int, Any] = {}
    seen: set[int] = set()

    def visit(value: Any, level: int) -> None:
        if id(value) in seen or level < 0:
            return
        seen.add(id(value))
        if isinstance(value, torch.nn.Module):
            found.setdefault(id(value), value)
            return
        if isinstance(value, types.MethodType):
            visit(value.__self__, level)
            visit(value.__func__, level)
        elif isinstance(value, types.FunctionType):
            for cell in value.__closure__ or ():
                try:
                    visit(cell.cell_contents, level - 1)
                except ValueError:  # empty cell
                    pass
            for name in value.__code__.co_names:
                if name in value.__globals__:
                    visit(value.__globals__[name], level - 1)
        elif isinstance(value, functools.partial):
            visit(value.func, level)
            for arg in (*value.args, *value.keywords.values()):
                visit(arg, level - 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, level - 1)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, level - 1)
        elif not isinstance(value, (type, types.ModuleType)) and hasattr(value, "__dict__"):
            for item in vars(value).values():
                visit(item, level - 1)

    visit(obj, depth)
    return list(found.values())
