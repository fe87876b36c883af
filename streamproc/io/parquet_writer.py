"""``write_parquet``'s output directory: preparing it, resuming it, committing parts, finishing it.

:class:`ParquetOutput` is the main-process half of :class:`~.sinks.ParquetSink`. It owns one
rank's files in the output directory (its manifest, and the parts of the groups it owns: see
:mod:`.parquet_parts` for the layout and :mod:`.manifest` for the commit point):

* :meth:`ParquetOutput.prepare` (before anything is touched) checks the directory, reads the
  manifest when resuming, refuses a changed input or layout, and returns the plan with its
  :class:`~streamproc.execution.selection.TaskSelection` set: ``tasks_per_group`` = ``G`` and,
  when resuming, ``done_groups`` = the committed groups, which the run skips without reading;
* :meth:`ParquetOutput.start` clears what is not committed (``overwrite``: every file of this
  rank; ``resume``: in-progress files and part files the manifest does not list);
* parts are written either here (:meth:`write`, outputs in task order) or in the CPU workers
  (:mod:`.worker_parts`; :meth:`record` takes their manifest entries, in task order when
  ``deterministic``);
* :meth:`commit` gives every part the run's final schema (rewriting, row group by row group,
  the parts written before a field got its type) and lists the part files in task order.

Ranks sharing a directory never touch each other's files: names are per group, groups are
dealt to ranks, and each rank only lists, deletes and records the groups it owns.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Optional

from ..errors import SchemaError, add_context_note
from ..execution.selection import TaskSelection
from .manifest import MANIFEST_PREFIX, Manifest, PartEntry, check_resumable, load_manifest, manifest_name, save_manifest
from .output_dir import OutputDir
from .parquet import PARQUET_SUFFIXES
from .parquet_parts import (
    DEFAULT_ROW_GROUP_ROWS,
    DEFAULT_ROWS_PER_FILE,
    PartFileWriter,
    PartSettings,
    check_part_sizes,
    parse_part_name,
    rewrite_part,
    tasks_per_group,
)
from .worker_parts import WorkerParquetSink
from .write_schema import ArrowTableFinalizer, records_to_table, schema_from_text, schema_to_text, unify_schemas

if TYPE_CHECKING:
    from ..execution.task import TaskOutput
    from ..plan import Plan

__all__ = [
    "DEFAULT_ROWS_PER_FILE",
    "DEFAULT_ROW_GROUP_ROWS",
    "ArrowTableFinalizer",
    "ParquetOutput",
    "records_to_table",
]


class ParquetOutput:
    """One rank's ``write_parquet`` output directory (main process); see the module docstring.

    Raises (from :meth:`prepare`):
        ValueError: ``overwrite`` and ``resume`` together, bad sizes, or a per-process
            filesystem (fsspec ``memory``) with parts written in worker processes.
        FileExistsError: the directory holds this rank's files and neither ``overwrite`` nor
            ``resume`` is set, or ``path`` is a file.
        ResumeMismatchError: ``resume`` over output of another input or task layout.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        overwrite: bool,
        resume: bool,
        schema: Any,
        rows_per_file: int,
        row_group_size: int,
        filesystem: Any = None,
    ) -> None:
        check_part_sizes(rows_per_file, row_group_size)
        if overwrite and resume:
            raise ValueError("write_parquet: overwrite=True and resume=True exclude each other")
        self.directory = OutputDir(path, filesystem)
        self.overwrite = overwrite
        self.resume = resume
        self.user_schema = schema
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        self.settings: Optional[PartSettings] = None
        self.selection = TaskSelection()
        self.manifest: Optional[Manifest] = None
        self.manifest_name = manifest_name(0, 1)
        self._part: Optional[PartFileWriter] = None
        self._schema: Any = None  # the union of the committed parts' schemas so far
        self._source_text = "the source"

    # -- before the run ---------------------------------------------------------------------------
    def prepare(self, plan: Plan, in_workers: bool) -> Plan:
        """Checks the directory and the manifest; returns ``plan`` with its task selection set."""
        selection = plan.task_selection or TaskSelection()
        self._source_text = plan.source.describe()
        group_size = tasks_per_group(self.rows_per_file, plan.source.rows_per_task(plan.task_size))
        self.selection = dataclasses.replace(selection, tasks_per_group=group_size)
        self.settings = PartSettings(self.directory, group_size, self.row_group_size, schema=self.user_schema)
        self.manifest_name = manifest_name(selection.rank, selection.world_size)
        assert not (in_workers and self.directory.is_per_process()), "a memory filesystem is written by the main process"
        kind = self.directory.kind()
        if kind == "file":
            raise FileExistsError(f"write_parquet: {self.directory.describe()!r} is a file; give a directory path")
        layout = {
            "task_size": plan.task_size, "rows_per_file": self.rows_per_file, "row_group_size": self.row_group_size,
            "tasks_per_group": group_size, "rank": selection.rank, "world_size": selection.world_size,
        }
        if self.resume:
            plan.source.check_stable_order("write_parquet(resume=True)")
        fingerprint = plan.source.fingerprint()
        names = self.directory.names()
        existing = load_manifest(self.directory, self.manifest_name) if self.resume else None
        if existing is not None:
            check_resumable(existing, fingerprint, layout, self.directory.describe())
            present = set(names)
            # A listed file the user deleted is not done: that group runs again.
            kept = {g: e for g, e in existing.parts.items() if e.file is None or e.file in present}
            existing.complete = existing.complete and len(kept) == len(existing.parts)
            existing.parts = kept
            self.manifest = existing
        else:
            self.manifest = Manifest(fingerprint, layout)
            if not self.overwrite and not self.resume:
                mine = names if selection.world_size == 1 else [n for n in names if self._owns(n)]
                if mine:
                    raise FileExistsError(
                        f"write_parquet: output directory {self.directory.describe()!r} is not empty; pass overwrite=True "
                        f"to replace its content, or resume=True to complete it (it holds {', '.join(mine[:3])}...)"
                    )
        self.selection = dataclasses.replace(self.selection, done_groups=frozenset(self.manifest.parts))
        return dataclasses.replace(plan, task_selection=self.selection)

    @property
    def complete(self) -> bool:
        """Whether the output is already complete (a resume after a finished run): nothing to run.

        The input was checked against the fingerprint where the source has one; an in-memory
        source is taken to be the same stream, as everywhere in resume."""
        return self.resume and self.manifest is not None and self.manifest.complete

    def _owns(self, name: str) -> bool:
        """Whether the file ``name`` is this rank's (its manifest, its parts, their in-progress files)."""
        if name in (self.manifest_name, f".{self.manifest_name}.tmp"):
            return True
        parsed = parse_part_name(name)
        if parsed is None:
            return False
        if self.selection.world_size == 1:
            return True  # an unsharded run owns every part, whatever layout wrote it
        key = parsed[0]
        return key % self.selection.tasks_per_group == 0 and self.selection.owns_group(key // self.selection.tasks_per_group)

    def start(self) -> None:
        """Clears what this run replaces (see the module docstring) and creates the directory."""
        assert self.manifest is not None
        self.directory.make()
        committed = set(self.manifest.part_files())
        for name in self.directory.names():
            if self.overwrite:
                stale = self._owns(name) or (
                    self.selection.world_size == 1
                    and (name.startswith(MANIFEST_PREFIX) or (name.endswith(PARQUET_SUFFIXES) and not name.startswith(".")))
                )
            else:
                stale = self._owns(name) and name != self.manifest_name and name not in committed
            if stale and self.directory.is_file(name):
                self.directory.delete(name)
        save_manifest(self.directory, self.manifest_name, self.manifest)
        for entry in sorted(self.manifest.parts.values(), key=lambda e: e.group):
            self._check_schema(entry)

    # -- during the run -----------------------------------------------------------------------------
    def write(self, output: TaskOutput) -> None:
        """Takes one output of a run that writes here (outputs in task order)."""
        assert self.settings is not None
        key = output.task_key if output.task_key is not None else output.task_index
        group = key // self.settings.group_size
        if self._part is not None and self._part.group != group:
            self._commit_part()  # the last group of a shard's stretch, or of the source
        if self._part is None:
            self._part = PartFileWriter(self.settings, group)
        if output.chunk is not None:
            self._part.write(output.chunk, f"task {key} of {self._source_text}")
        if output.last and (key + 1) % self.settings.group_size == 0:
            self._commit_part()

    def _commit_part(self) -> None:
        assert self._part is not None
        part, self._part = self._part, None
        self.record(part.commit())

    def record(self, entry: PartEntry) -> None:
        """Records a committed part in the manifest: from here on, it counts (main process)."""
        assert self.manifest is not None
        self._check_schema(entry)
        self.manifest.parts[entry.group] = entry
        save_manifest(self.directory, self.manifest_name, self.manifest)

    def _check_schema(self, entry: PartEntry) -> None:
        """Fails early, naming the field and the part, when parts' schemas cannot be one."""
        if entry.schema is not None and self.user_schema is None:
            self._schema = unify_schemas(self._schema, schema_from_text(entry.schema), self._part_text(entry))

    def _part_text(self, entry: PartEntry) -> str:
        assert self.settings is not None
        size = self.settings.group_size
        first = entry.group * size
        return f"{entry.file} (task {first})" if size == 1 else f"{entry.file} (tasks {first} to {first + size - 1})"

    # -- after the run ---------------------------------------------------------------------------------
    def commit(self) -> list[str]:
        """Completes the last part, gives every part the final schema; returns the part paths in order."""
        assert self.manifest is not None and self.settings is not None
        if self._part is not None:
            self._commit_part()
        entries = sorted(self.manifest.parts.values(), key=lambda e: e.group)
        final: Any = self.user_schema
        if final is None:
            for entry in entries:
                if entry.schema is not None:
                    final = unify_schemas(final, schema_from_text(entry.schema), self._part_text(entry))
        if final is not None:
            text = schema_to_text(final)
            for entry in entries:
                if entry.file is not None and entry.schema != text:
                    try:
                        rewrite_part(self.settings, entry.file, final)
                    except SchemaError as exc:
                        add_context_note(exc, f"streamproc: while giving {entry.file} the schema of the whole output")
                        raise
                    self.manifest.parts[entry.group] = dataclasses.replace(entry, schema=text)
                    save_manifest(self.directory, self.manifest_name, self.manifest)
            self.manifest.schema = text
        self.manifest.complete = True
        save_manifest(self.directory, self.manifest_name, self.manifest)
        return [self.directory.join(name) for name in self.manifest.part_files()]

    def abort(self) -> None:
        """Drops the part in progress, the workers' in-progress files and the parts they completed
        that the manifest does not list (committed parts stay).

        Runs after the backend stopped every worker. A part a worker completed after the part
        that failed (or whose entry had not reached the manifest) is not committed: dropping it
        leaves the committed parts only, as the simple backend would (``start`` of a resume
        would drop it too)."""
        part, self._part = self._part, None
        try:
            if part is not None:
                part.abort()
        finally:
            committed = set(self.manifest.part_files()) if self.manifest is not None else set()
            for name in self.directory.names():
                parsed = parse_part_name(name)
                if parsed is not None and (parsed[1] or name not in committed) and self._owns(name):
                    self.directory.delete(name)

    def worker_writers(self) -> WorkerParquetSink:
        assert self.settings is not None
        return WorkerParquetSink(self.settings)
