"""Hugging Face ``datasets`` in and out: ``from_huggingface`` and ``to_huggingface``.

``datasets`` is an optional extra (``pip install streamproc[datasets]``), imported only when
one of these functions runs. A ``datasets.Dataset`` is read through its Arrow table: tasks
are row ranges, sliced without a copy where the task runs (the dataset travels to each worker
once, with the stream; a dataset backed by cache files pickles as their paths). An
``IterableDataset`` is iterated in the main process, like ``from_iterable``.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

from .base import ChunkedSource, Source, row_ranges
from .memory import IterableSource
from .parquet import batch_to_records

INSTALL_HINT = "pip install streamproc[datasets]"


def import_datasets(what: str) -> ModuleType:
    """The ``datasets`` module, or an ImportError naming the pip command (where it is called)."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"{what} needs the Hugging Face datasets library: {INSTALL_HINT}") from exc
    return datasets


class HuggingFaceSource(ChunkedSource):
    """Dict records from a ``datasets.Dataset``, in the order of ``list(ds)``.

    Tasks are row ranges ``(start, stop)``. Rows are taken from the Arrow table with the
    dataset's indices mapping applied (after ``select``/``shuffle``/``filter``), so the
    records are ``ds[i]`` for each ``i``; features that decode (``Image``, ``Audio``) are
    decoded as ``ds[i]`` does, where the task runs.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset.with_format("arrow")
        features = dataset.features
        self._decoding_features = features if any(_requires_decoding(f) for f in features.values()) else None

    def iter_tasks(self, task_size: int) -> Iterator[tuple[int, int]]:
        return row_ranges(len(self.dataset), task_size)

    def read_task_chunks(self, payload: tuple[int, int], chunk_size: int) -> Iterator[list[dict[str, Any]]]:
        start, stop = payload
        for offset in range(start, stop, chunk_size):
            table = self.dataset[offset : min(offset + chunk_size, stop)]  # a pyarrow.Table (zero copy without indices)
            records = batch_to_records(table)
            if self._decoding_features is not None:
                records = [self._decoding_features.decode_example(record) for record in records]
            yield records

    def locate(self, payload: tuple[int, int], row: int | None = None) -> str:
        start, stop = payload
        return f"from_huggingface, rows {start}-{stop - 1}" if row is None else f"from_huggingface, row {start + row}"

    def num_records(self) -> int:
        return len(self.dataset)

    def describe(self) -> str:
        return f"from_huggingface(<Dataset {len(self.dataset)} rows x {len(self.dataset.column_names)} columns>)"


def _requires_decoding(feature: Any) -> bool:
    from datasets.features.features import require_decoding

    return bool(require_decoding(feature))


class HuggingFaceIterableSource(IterableSource):
    """Records of a ``datasets.IterableDataset``, iterated in the main process."""

    def describe(self) -> str:
        return f"from_huggingface(<IterableDataset {type(self.iterable).__name__}>)"


def make_huggingface_source(dataset: Any) -> Source:
    """The source of ``sp.from_huggingface`` (main process)."""
    datasets = import_datasets("from_huggingface()")
    if isinstance(dataset, datasets.Dataset):
        return HuggingFaceSource(dataset)
    if isinstance(dataset, datasets.IterableDataset):
        return HuggingFaceIterableSource(dataset)
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(
            f"from_huggingface() needs one split, got a {type(dataset).__name__} of {list(dataset)}: pass ds['train']"
        )
    raise TypeError(f"from_huggingface() needs a datasets.Dataset or datasets.IterableDataset, got {type(dataset).__name__}")


def table_to_dataset(table: Any) -> Any:
    """A ``datasets.Dataset`` over an Arrow table, without copying it (main process)."""
    datasets = import_datasets("to_huggingface()")
    return datasets.Dataset(datasets.table.InMemoryTable(table))
