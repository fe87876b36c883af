"""The manifest of a ``write_parquet`` output: the commit point of every part, and what resume checks.

One JSON file per rank in the output directory, ``_streamproc_manifest.json`` (or
``_streamproc_manifest.<rank>-of-<world_size>.json`` for a shard), rewritten atomically (a
hidden temporary file moved over it) after each part commit. It records:

* ``fingerprint``: the input, as the source describes it (:meth:`Source.fingerprint`; parquet:
  each file's path, size, rows and row groups; None: the source cannot tell, not checked);
* ``layout``: what decides the part files (``task_size``, ``rows_per_file``,
  ``row_group_size``, ``tasks_per_group``, ``rank``, ``world_size``);
* ``parts``: the committed part groups, each with its file name (None: the group produced no
  rows, so no file), its rows and its schema;
* ``schema``: the schema every part has once the run completed (None before);
* ``complete``: whether a run reached the end of the input (a resume then runs nothing).

A part file that the manifest does not list is not committed (a run died between writing it
and recording it): readers of an object store should read the manifest's list of files. Built
and written in the main process only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ResumeMismatchError
from .output_dir import OutputDir

MANIFEST_FORMAT = 1
MANIFEST_PREFIX = "_streamproc_manifest"


def manifest_name(rank: int, world_size: int) -> str:
    """``_streamproc_manifest.json``, or ``_streamproc_manifest.<rank>-of-<world_size>.json`` for a shard."""
    return f"{MANIFEST_PREFIX}.json" if world_size == 1 else f"{MANIFEST_PREFIX}.{rank}-of-{world_size}.json"


@dataclass(frozen=True)
class PartEntry:
    """A committed part group: ``file`` (None when it produced no rows), ``rows``, its schema as text."""

    group: int
    file: Optional[str]
    rows: int
    schema: Optional[str] = None


@dataclass
class Manifest:
    """What one rank has committed in an output directory (see the module docstring)."""

    fingerprint: Any
    layout: dict[str, int]
    parts: dict[int, PartEntry] = field(default_factory=dict)
    schema: Optional[str] = None
    complete: bool = False

    def to_json(self) -> str:
        entries = [
            {"group": e.group, "file": e.file, "rows": e.rows, "schema": e.schema}
            for e in sorted(self.parts.values(), key=lambda e: e.group)
        ]
        document = {
            "streamproc_manifest": MANIFEST_FORMAT,
            "fingerprint": self.fingerprint,
            "layout": self.layout,
            "parts": entries,
            "schema": self.schema,
            "complete": self.complete,
        }
        return json.dumps(document, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            document = json.loads(text)
            if document.get("streamproc_manifest") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {document.get('streamproc_manifest')!r}")
            parts = {
                int(e["group"]): PartEntry(int(e["group"]), e["file"], int(e["rows"]), e.get("schema"))
                for e in document["parts"]
            }
            return cls(
                document["fingerprint"], dict(document["layout"]), parts, document.get("schema"), bool(document.get("complete"))
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ResumeMismatchError(f"write_parquet(resume=True): the manifest {where} cannot be read: {exc}") from exc

    def part_files(self) -> list[str]:
        """The names of the committed part files, in group (task) order."""
        return [e.file for _, e in sorted(self.parts.items()) if e.file is not None]


def load_manifest(directory: OutputDir, name: str) -> Optional[Manifest]:
    """The manifest ``name`` in ``directory``, or None if there is none."""
    if not directory.is_file(name):
        return None
    return Manifest.from_json(directory.read_text(name), directory.join(name))


def save_manifest(directory: OutputDir, name: str, manifest: Manifest) -> None:
    """Rewrites the manifest atomically: the commit point of the parts it lists."""
    directory.write_text_atomically(name, manifest.to_json())


def _normalized(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), so that both sides compare equal."""
    return json.loads(json.dumps(value))


def _describe_input_change(before: Any, now: Any) -> str:
    if isinstance(before, dict) and isinstance(now, dict) and isinstance(before.get("files"), list):
        old = {f["path"]: f for f in before["files"]}
        new = {f["path"]: f for f in now.get("files", [])}
        changes = [f"{path} is new" for path in new if path not in old]
        changes += [f"{path} is gone" for path in old if path not in new]
        for path in old.keys() & new.keys():
            before_file, now_file = old[path], new[path]
            diffs = [
                f"{key} {before_file.get(key)} -> {now_file.get(key)}"
                for key in before_file
                if before_file.get(key) != now_file.get(key)
            ]
            if diffs:
                changes.append(f"{path}: {', '.join(diffs)}")
        if changes:
            return "the input changed: " + "; ".join(sorted(changes)[:10])
    return f"the input changed: it was {json.dumps(before)[:300]}, it is {json.dumps(now)[:300]}"


def check_resumable(manifest: Manifest, fingerprint: Any, layout: dict[str, int], where: str) -> None:
    """Raises ``ResumeMismatchError`` saying what changed since ``manifest`` was written.

    A fingerprint of None on either side (a source that cannot describe its input) is not
    checked; the layout always is.
    """
    changes = [
        f"{key} was {manifest.layout.get(key)!r}, it is {value!r}"
        for key, value in layout.items()
        if manifest.layout.get(key) != value
    ]
    if changes:
        raise ResumeMismatchError(
            f"write_parquet(resume=True): the task layout of {where} differs: {'; '.join(changes)}. "
            f"Resume with the same settings, or write again with overwrite=True"
        )
    if manifest.fingerprint is not None and fingerprint is not None and _normalized(fingerprint) != manifest.fingerprint:
        raise ResumeMismatchError(
            f"write_parquet(resume=True): {_describe_input_change(manifest.fingerprint, _normalized(fingerprint))} "
            f"since {where} was written. Resume over the same input, or write again with overwrite=True"
        )
