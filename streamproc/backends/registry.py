"""Backends by name, imported on demand (a worker's modules stay out of the core's imports)."""

from __future__ import annotations

import importlib

from .base import Backend

#: name -> "module:class", relative to this package.
_BACKENDS = {
    "simple": ".simple:SimpleBackend",
    "threads": ".threads:ThreadsBackend",
    "multiprocessing": ".multiprocessing.backend:MultiprocessingBackend",
    "ray": ".ray.backend:RayBackend",  # imports no Ray: the run does (an ImportError names the extra)
    # Not a set_processing(backend=...) choice: what a stream with pool=sp.connect(...) runs on.
    "service": "..service.client_run:ServiceBackend",
}


def get_backend(name: str) -> Backend:
    """A new instance of the backend called ``name``.

    Raises:
        ValueError: no backend has that name.
    """
    try:
        module_name, class_name = _BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(map(repr, _BACKENDS))}") from None
    backend_class = getattr(importlib.import_module(module_name, __package__), class_name)
    backend: Backend = backend_class()
    return backend
