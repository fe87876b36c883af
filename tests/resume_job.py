"""A write_parquet job run as its own process by tests/test_resume_kill.py (killed, then resumed).

``python -m tests.resume_job OUT CONFIG_JSON GATE RESUME``: writes ``N`` records into ``OUT``
with the ``set_processing`` options ``CONFIG_JSON``. When ``GATE`` >= 0, the record ``x == GATE``
creates ``OUT.gate`` and then blocks forever, so that the test kills the job at a known point
without any timing (it waits for that file and for the manifest's parts). ``RESUME`` is 0 or 1.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

import streamproc as sp

N = 240
TASK_SIZE = 10
#: 2 tasks (20 records) per part: 12 parts.
LAYOUT = {"rows_per_file": 20, "row_group_size": 8}


class BlocksAt:
    """The job's map: record ``gate`` announces itself (``flag`` file) and blocks forever."""

    def __init__(self, gate: int, flag: str) -> None:
        self.gate = gate
        self.flag = flag

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        if record["x"] == self.gate:
            with open(self.flag, "w"):
                pass
            threading.Event().wait()  # until the test kills this process
        return {"x": record["x"], "text": "t" * (record["x"] % 7), "half": record["x"] / 2}


def build_stream(config: dict[str, Any], gate: int = -1, flag: str = "") -> sp.Stream:
    records = ({"x": i} for i in range(N))  # a generator: a resumed run re-iterates a fresh one
    return sp.from_iterable(records).map(BlocksAt(gate, flag)).set_processing(task_size=TASK_SIZE, **config)


def main(argv: list[str]) -> None:
    out, config, gate, resume = argv[0], json.loads(argv[1]), int(argv[2]), argv[3] == "1"
    paths = build_stream(config, gate, f"{out}.gate").write_parquet(out, resume=resume, **LAYOUT)
    print(json.dumps([os.path.basename(p) for p in paths]))


if __name__ == "__main__":
    main(sys.argv[1:])
