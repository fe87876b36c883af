"""Helpers of the write_parquet tests: what a written directory holds, to compare two of them.

Everything here is module level so that it pickles by reference to worker processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

MANIFEST = "_streamproc_manifest.json"


def snapshot(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Every file of ``directory``: parts as (rows, schema, row group sizes), the manifest's parts and schema."""
    result: dict[str, Any] = {}
    for name in sorted(os.listdir(directory)):
        path = Path(directory) / name
        if name.endswith(".parquet"):
            metadata = pq.ParquetFile(path).metadata
            table = pq.read_table(path)
            sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            result[name] = (table.to_pylist(), str(table.schema), sizes)
        elif name.startswith("_streamproc_manifest"):
            document = json.loads(path.read_text())
            result[name] = (document["parts"], document["schema"], document["layout"])
        else:
            result[name] = path.read_bytes()
    return result


def manifest_parts(directory: str | os.PathLike[str], name: str = MANIFEST) -> list[dict[str, Any]]:
    """The committed parts the manifest lists ([] while there is no manifest)."""
    try:
        text = (Path(directory) / name).read_text()
    except FileNotFoundError:
        return []
    parts: list[dict[str, Any]] = json.loads(text)["parts"]
    return parts


def mark_incomplete(directory: str | os.PathLike[str], name: str = MANIFEST) -> None:
    """Makes a complete output look like one whose run died after its last commit (a shorter
    stream stood in for the interrupted one): a resume then runs the rest of the input."""
    path = Path(directory) / name
    document = json.loads(path.read_text())
    document["complete"] = False
    path.write_text(json.dumps(document))


class FailsWhileFileExists:
    """A map that raises at record ``at`` (by its ``"x"``) while the file ``flag`` exists."""

    def __init__(self, flag: str, at: int) -> None:
        self.flag = flag
        self.at = at

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        if record["x"] == self.at and os.path.exists(self.flag):
            raise RuntimeError(f"failing at {self.at} while {self.flag} exists")
        return {**record, "y": record["x"] * 2}


class RaisesBelow:
    """A map that raises for any record whose ``"x"`` is below ``limit`` (proves those are not read again)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        if record["x"] < self.limit:
            raise AssertionError(f"record {record['x']} of a committed part was processed again")
        return {**record, "y": record["x"] * 2}


def doubled(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "y": record["x"] * 2}
