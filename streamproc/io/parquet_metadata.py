"""Parquet footers read once per file and process: a cache checked against each file's size and mtime.

A run asks a parquet source about its files' footers many times before the first record is
read, all in the main process: the part layout (``rows_per_task``, twice), the number of part
groups (``num_tasks``), progress and ``explain`` (``num_records``), ``resume``'s fingerprint
and the task list (``iter_tasks``); with the simple and threads backends the tasks are read
there too. :class:`FooterCache` reads each file's footer the first time it is asked for, and
answers the next questions from memory while the file is unchanged.

Never stale: every lookup stats the file (one ``get_file_info``: microseconds on a local disk,
where a footer read opens the file, reads its tail and decodes it) and the entry is used only
if the file's size and modification time (ns) are the ones it was read with. A file rewritten
between two runs of one stream, or during a run, is read again. A filesystem that gives no
modification time (some fsspec ones) gets no caching: its footers are read at every lookup.
A footer that cannot be read is not cached (the next lookup fails again, the same way).

The cache does not travel: a pickled source (the multiprocessing and Ray backends' workers)
starts with an empty one, so a worker reads the footers of the files it opens itself, once.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq


class FileFooter(NamedTuple):
    """What a run needs from one file's footer (read once, see the module docstring)."""

    path: str
    #: The file's size in bytes when the footer was read (the fingerprint's ``size``).
    size: int
    metadata: pq.FileMetaData
    #: Rows of each row group, in order.
    row_group_rows: tuple[int, ...]
    #: The file's whole Arrow schema (every column).
    schema: pa.Schema


class FooterCache:
    """``path -> FileFooter`` for the files of one source (the process that asks: main process,
    or a worker for the files it reads). Thread-safe: the threads backend's threads share it.

    Args:
        filesystem: the ``pyarrow.fs.FileSystem`` the files are on.
    """

    def __init__(self, filesystem: Any) -> None:
        self.filesystem = filesystem
        self._entries: dict[str, tuple[tuple[int, int], FileFooter]] = {}
        self._lock = threading.Lock()

    def footer(self, path: str) -> FileFooter:
        """The footer of ``path``, read from the file unless an entry of the same size and mtime is held.

        Raises what ``pyarrow.parquet.read_metadata`` raises (``OSError``, ``ArrowException``):
        the caller names the file (:func:`streamproc.io.parquet._corrupt_footer`).
        """
        version = self._version(path)
        if version is not None:
            with self._lock:
                held = self._entries.get(path)
            if held is not None and held[0] == version:
                return held[1]
        footer = self._read(path, version)
        if version is not None:
            with self._lock:
                self._entries[path] = (version, footer)
        return footer

    def _version(self, path: str) -> Optional[tuple[int, int]]:
        """``(size, mtime_ns)`` of ``path``; None when the file is missing (reading it raises
        its own error) or its filesystem gives no modification time (no caching)."""
        import pyarrow.fs as pafs

        info = self.filesystem.get_file_info(path)
        if info.type != pafs.FileType.File or info.size is None or info.mtime_ns is None:
            return None
        return int(info.size), int(info.mtime_ns)

    def _read(self, path: str, version: Optional[tuple[int, int]]) -> FileFooter:
        import pyarrow.parquet as pq

        metadata = pq.read_metadata(path, filesystem=self.filesystem)
        rows = tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))
        size = version[0] if version is not None else int(self.filesystem.get_file_info(path).size or 0)
        return FileFooter(path, size, metadata, rows, metadata.schema.to_arrow_schema())

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        # Unpickled empty: a worker's copy of the source reads the footers it needs itself, and the
        # plan sent to each worker does not carry every file's metadata.
        return FooterCache, (self.filesystem,)
