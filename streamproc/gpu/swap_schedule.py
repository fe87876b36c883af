"""Which uploaded batch a GPU worker computes next under a memory budget: pure, no processes.

Runs in the GPU worker (:mod:`streamproc.backends.multiprocessing.gpu_worker`), which reads
every ready request (and uploads its batch) before computing one, so it usually holds batches
of several stages. Without a budget it computes them oldest first, as it always did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class RoundSchedule:
    """Serves the batches of models already on the device first, in rounds.

    A *round* is the batches waiting when it starts (the oldest ``len(pending)``); batches that
    arrive during a round belong to the next one. Within a round the worker takes the oldest
    batch whose models are on the device; when none is, the oldest batch of the round (its
    models are then loaded: a swap).

    Bounds (``m`` = the distinct model sets of a round's batches, ``n`` = its batches):

    * **No starvation.** A batch is computed before any batch of a later round, so it waits at
      most ``n - 1`` computes; ``n`` is at most the batches in flight to this worker
      (CPU peers x stages x ``MAX_BATCHES_IN_FLIGHT_PER_GPU`` x GPU workers per cycle).
    * **Swaps <= m per round.** A swap happens only when no batch left in the round has its
      models on the device; right after it, the models of the batch that forced it are on the
      device, and they stay there until the next swap, which happens only once no batch left
      in the round needs them. So each model set forces at most one swap per round.
    * **At most one swap per task and stage when one CPU worker feeds this GPU worker.** Under a
      budget a CPU worker runs a task's batches of one stage as one *phase*
      (:class:`~streamproc.gpu.forward.PhasedForwardRunner`): it sends none of stage ``s + 1``'s
      batches before it has every output of stage ``s``'s. So the batches waiting here, round
      after round, belong to one (task, stage) phase at a time: ``m = 1``, and only the first
      round of a phase can swap. With several CPU workers, phases of several stages overlap
      and the per-round bound above is the one that holds.

    >>> schedule = RoundSchedule()
    >>> loaded = {"a"}
    >>> pending = ["b1", "a1", "b2", "a2"]
    >>> [pending.pop(schedule.pick(pending, lambda batch: batch[0] in loaded)) for _ in range(2)]
    ['a1', 'a2']
    """

    def __init__(self) -> None:
        self._left_in_round = 0

    @property
    def left_in_round(self) -> int:
        """Batches of the current round not yet picked (0: the next pick starts a round)."""
        return self._left_in_round

    def pick(self, pending: Sequence[T], is_loaded: Callable[[T], bool]) -> int:
        """The index in ``pending`` (oldest first, non-empty) of the batch to compute next.

        The caller removes that batch from ``pending`` before it calls again, and only appends
        new batches at the end.
        """
        if self._left_in_round == 0:
            self._left_in_round = len(pending)
        chosen = next((i for i in range(self._left_in_round) if is_loaded(pending[i])), 0)
        self._left_in_round -= 1
        return chosen
