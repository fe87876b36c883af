"""An output directory on any filesystem: the few operations part writers and manifests need.

Local paths, ``scheme://`` URIs (pyarrow's filesystems), a ``pyarrow.fs.FileSystem`` or an
fsspec filesystem are all seen through one ``pyarrow.fs.FileSystem``. Picklable (the
filesystem travels to the CPU workers that write their own parts). Runs wherever parts are
written: the main process, or a CPU worker.

On a local filesystem :meth:`OutputDir.move` is a rename, atomic; on an object store it is a
copy then a delete, so a file under its final name is no proof of a commit there: the
manifest is (see :mod:`.manifest`).
"""

from __future__ import annotations

import os
from typing import Any


class OutputDir:
    """The directory ``path`` on ``filesystem`` (None: local, or the one a URI names)."""

    def __init__(self, path: str | os.PathLike[str], filesystem: Any = None) -> None:
        import pyarrow.fs as pafs

        from .paths import as_arrow_filesystem

        text = os.fspath(path)
        if filesystem is None:
            if "://" in text:
                self.fs, text = pafs.FileSystem.from_uri(text)
            else:
                self.fs, text = pafs.LocalFileSystem(), os.path.abspath(text)
        else:
            strip = getattr(filesystem, "_strip_protocol", None)  # fsspec: "memory://out" -> "/out"
            text = strip(text) if callable(strip) else text
            self.fs = as_arrow_filesystem(filesystem)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.path = text.rstrip("/") or "/"

    def join(self, name: str) -> str:
        """The full path of the file ``name`` in this directory."""
        return os.path.join(self.path, name) if self.is_local else f"{self.path.rstrip('/')}/{name}"

    def describe(self) -> str:
        return self.path if self.is_local else f"{self.path!r} on {type(self.fs).__name__}"

    def is_per_process(self) -> bool:
        """Whether the filesystem lives in this process only (fsspec's ``memory``)."""
        fsspec_fs = getattr(getattr(self.fs, "handler", None), "fs", None)
        protocol = getattr(fsspec_fs, "protocol", ())
        return "memory" in ((protocol,) if isinstance(protocol, str) else protocol)

    def kind(self) -> str:
        """``"dir"``, ``"file"`` or ``"missing"``."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            return "missing"
        return "dir" if info.type == pafs.FileType.Directory else "file"

    def names(self) -> list[str]:
        """The names of the entries directly in the directory (none if it is missing)."""
        import pyarrow.fs as pafs

        if self.kind() != "dir":
            return []
        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        return sorted(info.path.rstrip("/").rsplit("/", 1)[-1] for info in self.fs.get_file_info(selector))

    def is_file(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return bool(self.fs.get_file_info(self.join(name)).type == pafs.FileType.File)

    def make(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self, name: str) -> None:
        """Deletes the file ``name``; one already gone is fine (its writer may have moved it)."""
        try:
            self.fs.delete_file(self.join(name))
        except FileNotFoundError:
            pass

    def move(self, source: str, target: str) -> None:
        """Renames ``source`` to ``target`` (replacing it): atomic on a local filesystem."""
        if self.is_local:
            os.replace(self.join(source), self.join(target))
        else:
            self.fs.move(self.join(source), self.join(target))

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self.join(name)) as stream:
            return bytes(stream.read()).decode("utf-8")

    def write_text_atomically(self, name: str, text: str) -> None:
        """Writes ``name`` under a hidden temporary name, then moves it over ``name``."""
        temporary = f".{name}.tmp"
        with self.fs.open_output_stream(self.join(temporary)) as stream:
            stream.write(text.encode("utf-8"))
            if self.is_local:
                stream.flush()
        if self.is_local:
            # The rename is the commit: the data must be on disk before it (power loss).
            fd = os.open(self.join(temporary), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.move(temporary, name)
