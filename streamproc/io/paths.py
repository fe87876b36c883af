"""Resolving user paths (a file, a directory, a glob or a list) to files on a filesystem.

Runs in the main process when a source is created, so that a missing path fails at once.
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Sequence
from typing import Any, Union

PathLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

_GLOB_CHARS = set("*?[")


def as_arrow_filesystem(filesystem: Any) -> Any:
    """A ``pyarrow.fs.FileSystem`` for ``filesystem`` (None, a pyarrow one, or an fsspec one)."""
    import pyarrow.fs as pafs

    if filesystem is None or isinstance(filesystem, pafs.FileSystem):
        return filesystem
    if hasattr(filesystem, "protocol") and hasattr(filesystem, "open"):  # fsspec.AbstractFileSystem
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
    raise TypeError(f"filesystem must be a pyarrow.fs.FileSystem or an fsspec filesystem, got {type(filesystem).__name__}")


def _is_hidden(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.startswith((".", "_"))


def _has_hidden_part(path: str, base: str) -> bool:
    """Whether a part of ``path`` below the directory ``base`` is a hidden name."""
    return any(_is_hidden(part) for part in os.path.relpath(path, base).split(os.sep))


def resolve_files(path: PathLike, suffixes: tuple[str, ...], filesystem: Any = None, what: str = "read") -> tuple[Any, list[str]]:
    """Expands ``path`` into a sorted list of files and the pyarrow filesystem to read them with.

    A directory yields the files under it (recursively) whose names end with one of
    ``suffixes``, skipping hidden and ``_``-prefixed files (``_SUCCESS``, in-progress parts).
    A glob is expanded; a list is expanded item by item, keeping its order. A file that
    several items match (a directory and a file in it, a recursive glob) is read once, where
    it first appears.

    Raises:
        FileNotFoundError: a path (or a glob) that matches nothing, or a directory without
            matching files.
    """
    import pyarrow.fs as pafs

    fs = as_arrow_filesystem(filesystem)
    if isinstance(path, (str, os.PathLike)):
        items = [os.fspath(path)]
    else:
        items = [os.fspath(p) for p in path]
        if not items:
            raise FileNotFoundError(f"{what}: the list of paths is empty")
    files: list[str] = []
    resolved_fs = fs
    for item in items:
        # Each item is resolved on its own: a relative path later in a list is made absolute
        # too, and a URI picks its filesystem, whatever the items before it were.
        item_fs = fs
        if item_fs is None:
            if "://" in item:
                item_fs, item = pafs.FileSystem.from_uri(item)
            else:
                item_fs, item = pafs.LocalFileSystem(), os.path.abspath(item)
        resolved_fs = item_fs
        if _GLOB_CHARS & set(item):
            if not isinstance(item_fs, pafs.LocalFileSystem):
                raise ValueError(f"{what}: globs are supported on the local filesystem only, got {item!r}")
            matches = sorted(globlib.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{what}: no file matches {item!r}")
            # As in a directory, "_SUCCESS" and other hidden names are skipped (unless the
            # pattern itself asks for them).
            base = os.path.dirname(item[: min(item.index(c) for c in _GLOB_CHARS if c in item)])
            if not _has_hidden_part(item, base):
                matches = [match for match in matches if not _has_hidden_part(match, base)]
            for match in matches:
                files.extend(_expand_one(item_fs, match, suffixes, what))
        else:
            files.extend(_expand_one(item_fs, item, suffixes, what))
    return resolved_fs, list(dict.fromkeys(files))


def _expand_one(fs: Any, path: str, suffixes: tuple[str, ...], what: str) -> list[str]:
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what}: no such file or directory: {path!r}")
    if info.type == pafs.FileType.File:
        return [path]
    selector = pafs.FileSelector(path, recursive=True)
    found = sorted(
        entry.path
        for entry in fs.get_file_info(selector)
        if entry.type == pafs.FileType.File
        and entry.path.endswith(suffixes)
        and not any(_is_hidden(part) for part in os.path.relpath(entry.path, path).split(os.sep))
    )
    if not found:
        raise FileNotFoundError(f"{what}: no {'/'.join(suffixes)} file under directory {path!r}")
    return found
