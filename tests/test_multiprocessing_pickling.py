"""User code defined in a script's ``__main__`` reaches the workers under every start method.

Under spawn and forkserver a worker's ``__main__`` is not the user's script, so a function or
class defined there cannot be pickled by reference; the stream is serialized with dill instead.
The real thing is tested: a script run as ``python script.py`` in a subprocess (with a timeout),
with lambdas, closures, a function, a callable class, a record class and an exception class
all defined in its ``__main__``. Inside pytest, closures and locally defined classes of a test
module are checked too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

import streamproc as sp
from tests.utils import UserError

#: A spawned interpreter, two workers and a few runs: seconds; far more means a hang.
SCRIPT_TIMEOUT_S = 120

SCRIPT = textwrap.dedent(
    '''
    import json
    import sys
    from dataclasses import dataclass

    import streamproc as sp


    class ScriptError(Exception):
        """Raised in a worker; the script must catch it as its own class."""


    @dataclass
    class Point:
        x: int
        y: int


    class Scale:
        def __init__(self, factor):
            self.factor = factor

        def __call__(self, p):
            return Point(p.x * self.factor, p.y)


    def to_point(i):
        return Point(i, -i)


    def make_adder(k):
        def add_k(p):  # a closure over k
            return Point(p.x + k, p.y)

        return add_k


    def is_point(p):  # a class of __main__ inside a worker: isinstance must hold
        return isinstance(p, Point)


    def fails_on_3(x):
        if x == 3:
            raise ScriptError("three")  # line that raises
        return x


    def pipeline(options):
        return (
            sp.from_iterable(range(40))
            .map(to_point)
            .map(Scale(3))
            .map(make_adder(100))
            .filter(lambda p: p.x % 2 == 0)
            .map_batches(lambda batch: [[(p.x, p.y) for p in batch]], batch_size=3)
            .set_processing(**options)
        )


    if __name__ == "__main__":
        method = sys.argv[1]
        options = dict(backend="multiprocessing", num_cpu_workers=2, task_size=7, process_start_method=method)
        expected = pipeline(dict(backend="simple", task_size=7)).to_list()
        actual = pipeline(options).to_list()
        points = sp.from_iterable(range(5)).map(to_point).set_processing(**options).to_list()
        simple_points = sp.from_iterable(range(5)).map(to_point).to_list()
        checked_in_workers = sp.from_iterable([Point(1, 2), Point(3, 4)]).map(is_point).set_processing(**options).to_list()
        caught = None
        try:
            sp.from_iterable(range(6)).map(fails_on_3).set_processing(**options).to_list()
        except ScriptError as exc:  # the script's own class, not a copy
            caught = {
                "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                "message": str(exc),
                "cause": type(exc.__cause__).__name__,
                "line_in_cause": 'raise ScriptError("three")' in str(exc.__cause__),
            }
        print(json.dumps({
            "method": method,
            "same_as_simple": actual == expected,
            "n": len(actual),
            "points": [type(p).__module__ + "." + type(p).__qualname__ for p in points],
            "points_are_main_points": all(isinstance(p, Point) for p in points),
            "points_equal_simple": points == simple_points,  # dataclass __eq__ needs the same class
            "isinstance_in_workers": checked_in_workers,
            "caught": caught,
        }))
    '''
)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_script_with_main_module_callables(tmp_path, method):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), method], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {
        "method": method,
        "same_as_simple": True,
        "n": 9,  # 20 of 40 points kept, in batches of at most 3 within each task of 7
        "points": ["__main__.Point"] * 5,
        "points_are_main_points": True,
        "points_equal_simple": True,
        "isinstance_in_workers": [True, True],
        "caught": {"type": "__main__.ScriptError", "message": "three", "cause": "RemoteTraceback", "line_in_cause": True},
    }


# -- inside pytest: closures and local classes of a test module -----------------------------------


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_closures_lambdas_and_local_classes(method):
    offset = 1000

    class LocalError(Exception):
        pass

    class Shift:
        def __call__(self, x: int) -> int:
            return x + offset

    def raise_on(x: int) -> int:
        if x == offset + 5:
            raise LocalError("local")
        return x

    options: dict[str, Any] = {"backend": "multiprocessing", "num_cpu_workers": 2, "task_size": 4, "process_start_method": method}
    stream = sp.from_iterable(range(20)).map(Shift()).map(lambda x: x * 2).set_processing(**options)
    assert stream.to_list() == [(x + offset) * 2 for x in range(20)]
    with pytest.raises(Exception, match="local") as info:
        sp.from_iterable(range(20)).map(Shift()).map(raise_on).set_processing(**options).to_list()
    # A class local to a test function travels by value: its name survives the trip.
    assert type(info.value).__qualname__.endswith("LocalError")
    assert isinstance(info.value.__cause__, sp.RemoteTraceback)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_module_level_user_error_keeps_its_identity(method):
    def raise_user_error(x: int) -> int:
        if x == 3:
            raise UserError("module level")
        return x

    options = {"backend": "multiprocessing", "num_cpu_workers": 2, "task_size": 2, "process_start_method": method}
    with pytest.raises(UserError) as info:
        sp.from_iterable(range(10)).map(raise_user_error).set_processing(**options).to_list()
    assert type(info.value) is UserError
