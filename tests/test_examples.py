"""The examples run as documented (a subprocess each, small inputs, under a timeout that fails)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_TIMEOUT_S = 240


def test_two_models_into_sqlite_swaps_as_its_bound_says(tmp_path):
    example = REPO / "examples" / "two_models_into_sqlite.py"
    result = subprocess.run(
        [sys.executable, str(example), "--out", str(tmp_path), "--copies", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    written = re.search(r"(\d+) of (\d+) paragraphs written \((\d+) rows", result.stdout)
    assert written and written.group(1) == written.group(2) == written.group(3), result.stdout
    swaps = int(re.search(r"(\d+) model swaps", result.stdout).group(1))
    tasks = -(-int(written.group(2)) // 256)  # one task per parquet row group of 256 rows
    assert swaps == 2 * tasks - 1, result.stdout  # one CPU worker feeds the GPU worker: 2T - 1
