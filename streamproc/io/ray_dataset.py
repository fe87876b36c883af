"""Interop with Ray Data: ``sp.from_ray_dataset(ds)`` and ``Stream.to_ray_dataset()`` (main process).

Thin on purpose. ``from_ray_dataset`` streams ``ds.iter_rows()`` (dict records) into tasks in
the main process, as ``from_iterable`` does, so it works on every backend (workers need no
Ray connection); the rows pass through the driver. ``to_ray_dataset`` runs the stream to an
Arrow table (``Stream.to_arrow``) and hands it to ``ray.data.from_arrow``. Ray is imported
lazily; without it, an ImportError names ``pip install 'streamproc[ray]'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from .memory import IterableSource


class _DatasetRows:
    """Re-iterable rows of a Ray ``Dataset``: each iteration runs ``ds.iter_rows()`` anew."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Ray Data's streaming executor gives blocks in any order unless told to keep it. A
        # dataset runs with the context it holds (a copy made when it was created), so the
        # option is set there, for this iteration only.
        options = self.dataset.context.execution_options
        kept = options.preserve_order
        options.preserve_order = True
        try:
            yield from self.dataset.iter_rows()
        finally:
            options.preserve_order = kept

    def __repr__(self) -> str:
        return f"ray.data.Dataset({self.dataset.schema()})"


class RayDatasetSource(IterableSource):
    """Dict records of a Ray ``Dataset``, in its row order, pulled ``task_size`` at a time (main process)."""

    def __init__(self, dataset: Any) -> None:
        super().__init__(_DatasetRows(dataset))
        self.dataset = dataset

    def num_records(self) -> Optional[int]:
        """None: counting a dataset may run it (progress shows no total)."""
        return None

    def describe(self) -> str:
        return f"from_ray_dataset({self.iterable!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"iterable": (), "dataset": None}  # workers only call read_task: records travel in the tasks


def make_ray_dataset_source(dataset: Any) -> RayDatasetSource:
    """The source of ``sp.from_ray_dataset`` (main process).

    Raises:
        ImportError: Ray is not installed, naming the pip command.
        TypeError: ``dataset`` is not a ``ray.data.Dataset``.
    """
    ray = import_ray_for("from_ray_dataset()")
    if not isinstance(dataset, ray.data.Dataset):
        raise TypeError(f"from_ray_dataset() needs a ray.data.Dataset, got {type(dataset).__name__}")
    return RayDatasetSource(dataset)


def table_to_ray_dataset(table: Any) -> Any:
    """A Ray ``Dataset`` over a ``pyarrow.Table`` (main process; the driver joins a cluster if needed)."""
    ray = import_ray_for("to_ray_dataset()")
    return ray.data.from_arrow(table)


def import_ray_for(what: str) -> Any:
    """The ``ray`` module, or an ImportError naming ``what`` and the pip command."""
    from ..backends.ray.cluster import import_ray

    return import_ray(what)
