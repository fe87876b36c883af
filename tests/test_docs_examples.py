"""The examples of docs/api.md run as written (doctest), so the reference cannot drift from the code."""

from __future__ import annotations

import doctest
import pathlib

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def test_api_reference_examples_run() -> None:
    result = doctest.testfile(str(DOCS / "api.md"), module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 40, result
    assert result.failed == 0, result


def test_sql_page_examples_run(tmp_path) -> None:
    import os

    import streamproc as sp

    globs = {"os": os, "sp": sp, "tmp": str(tmp_path)}
    result = doctest.testfile(str(DOCS / "sql.md"), module_relative=False, optionflags=doctest.ELLIPSIS, globs=globs)
    assert result.attempted >= 5, result
    assert result.failed == 0, result
