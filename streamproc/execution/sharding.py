"""Which shard of a job this process is: ``shard="auto" | (rank, world_size)`` resolved (main process).

``shard="auto"`` reads the launcher's environment: torchrun's ``RANK``/``WORLD_SIZE`` first
(torchrun started under ``srun`` sets both pairs, and its ``RANK`` is the global one), else
Slurm's ``SLURM_PROCID``/``SLURM_NTASKS``, else the job is not sharded, ``(0, 1)``. Under
torchrun, ``LOCAL_RANK`` also picks the default device of forward (:func:`torchrun_local_device`).
Pure functions of an environment mapping, so they are tested without launching anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional, Union

#: What ``set_processing(shard=...)`` holds once validated (``options._check_shard``).
ShardOption = Union[None, str, tuple[int, int]]

#: The environment variable pairs ``shard="auto"`` reads, in order of precedence.
SHARD_ENV_PAIRS = (("RANK", "WORLD_SIZE", "torchrun"), ("SLURM_PROCID", "SLURM_NTASKS", "Slurm"))


def resolve_shard(shard: ShardOption, environ: Optional[Mapping[str, str]] = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process for the option ``shard``.

    >>> resolve_shard(None)
    (0, 1)
    >>> resolve_shard((1, 3))
    (1, 3)
    >>> resolve_shard("auto", {"RANK": "2", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    (2, 4)
    >>> resolve_shard("auto", {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    (1, 2)
    >>> resolve_shard("auto", {})
    (0, 1)

    Args:
        shard: None (not sharded), ``"auto"`` or ``(rank, world_size)`` (already validated).
        environ: The environment to read (default ``os.environ``).

    Raises:
        ValueError: ``"auto"`` in an inconsistent environment: one variable of a pair set
            without the other, a value that is not an integer, or a rank outside
            ``[0, world_size)``; the message names the variables and their values.
    """
    if shard is None:
        return 0, 1
    if isinstance(shard, tuple):
        return shard
    env = os.environ if environ is None else environ
    for rank_name, size_name, launcher in SHARD_ENV_PAIRS:
        rank_text, size_text = env.get(rank_name), env.get(size_name)
        if rank_text is None and size_text is None:
            continue
        found = f"{rank_name}={rank_text!r}, {size_name}={size_text!r}"
        if rank_text is None or size_text is None:
            raise ValueError(f"shard='auto': {launcher} environment is incomplete ({found}): both must be set, or neither")
        try:
            rank, world_size = int(rank_text), int(size_text)
        except ValueError:
            raise ValueError(f"shard='auto': {launcher} environment is not a pair of integers ({found})") from None
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"shard='auto': {launcher} environment is inconsistent ({found}): need 0 <= rank < world_size")
        return rank, world_size
    return 0, 1


def torchrun_local_rank(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """torchrun's ``LOCAL_RANK`` (this process's index on its node), or None outside torchrun.

    >>> torchrun_local_rank({"LOCAL_RANK": "3"})
    3
    >>> torchrun_local_rank({}) is None
    True

    Raises:
        ValueError: ``LOCAL_RANK`` is set but is not a non-negative integer.
    """
    env = os.environ if environ is None else environ
    text = env.get("LOCAL_RANK")
    if text is None:
        return None
    try:
        local_rank = int(text)
    except ValueError:
        local_rank = -1
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK={text!r} (torchrun) is not a non-negative integer")
    return local_rank


def torchrun_local_device(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``"cuda:{LOCAL_RANK}"`` under torchrun, else None: the default device of forward there.

    >>> torchrun_local_device({"LOCAL_RANK": "1"})
    'cuda:1'
    """
    local_rank = torchrun_local_rank(environ)
    return None if local_rank is None else f"cuda:{local_rank}"
