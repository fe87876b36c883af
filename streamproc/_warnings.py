"""Warnings that point at the user's code, not at streamproc's frames."""

from __future__ import annotations

import contextlib
import os
import sys
from types import FrameType
from typing import Optional

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _is_internal(filename: str) -> bool:
    return filename.startswith(_PACKAGE_DIR) or filename == contextlib.__file__


def stacklevel_outside_streamproc() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside streamproc.

    Call it from the function that warns. A fixed level cannot: the sink (``to_list``,
    ``iter``, ``write_parquet``...) reaches the backend through a varying number of frames,
    some of them ``contextlib``'s (pandas' ``find_stack_level`` walks the stack the same way).
    """
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1  # our caller, the function that warns
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level
