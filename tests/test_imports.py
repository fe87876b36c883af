"""The core never imports torch: only a stream with a map_gpu stage does, when it runs.

Checked in fresh interpreters, since the test runner itself has torch loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import streamproc as sp


def run_python(code: str, tmp_path: Path) -> str:
    repo_root = Path(sp.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_does_not_import_torch(tmp_path):
    assert run_python("import sys, streamproc; print('torch' in sys.modules)", tmp_path) == "False"


def test_stream_without_gpu_stage_does_not_import_torch(tmp_path):
    code = """
        import sys
        import pandas as pd
        import streamproc as sp

        stream = (
            sp.from_iterable(range(100))
            .map(lambda x: {"x": x, "text": "a" * (x % 7)})
            .filter(lambda r: r["x"] % 3)
            .map_batches(lambda b: b[::-1], batch_size="20 tokens", batch_by="text")
            .map(lambda r: [r])
            .flatten()
            .set_processing(autocast="bfloat16", batch_size=8, show_progress=False, task_size=10)
        )
        paths = stream.write_parquet("out")
        assert len(sp.read_parquet("out").to_list()) == 66
        stream.write_jsonl("out.jsonl")
        assert len(sp.read_jsonl("out.jsonl").to_pandas()) == 66
        assert len(sp.from_pandas(pd.DataFrame({"a": [1, 2]})).to_list()) == 2
        repr(stream)
        print('torch' in sys.modules)
    """
    assert run_python(code, tmp_path) == "False"


def test_stream_with_gpu_stage_imports_torch_only_when_it_runs(tmp_path):
    code = """
        import sys
        import streamproc as sp

        stream = sp.from_iterable([1.0, 2.0]).map_gpu(lambda recs: recs, lambda batch: batch)
        repr(stream)
        before = 'torch' in sys.modules
        import torch
        out = sp.from_iterable([1.0, 2.0]).map_gpu(torch.tensor, lambda t: t * 2).to_list()
        print(before, out)
    """
    assert run_python(code, tmp_path) == "False [2.0, 4.0]"
