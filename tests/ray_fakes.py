"""Fakes of the Ray tests that run inside actors (no test here; light to import: no Ray)."""

from __future__ import annotations

import os
import signal
from typing import Any


def kill_in_forward(batch: Any) -> Any:
    """A ``forward`` that ends its own process (SIGKILL, as the OOM killer would): a GPU actor dying."""
    os.kill(os.getpid(), signal.SIGKILL)
    return batch


def tag_with_node(record: Any) -> Any:
    """A ``map`` fn: the record and the Ray node that ran it (the actor's node id)."""
    import ray

    return {"x": record, "node": ray.get_runtime_context().get_node_id()}
