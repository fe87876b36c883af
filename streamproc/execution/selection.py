"""Which tasks of a stream one run does: resume skips committed part groups, a shard keeps its own.

Tasks are numbered by their key in the whole stream (0, 1, 2, ... in source order). Consecutive
tasks form *part groups* of ``tasks_per_group`` (part ``g`` of ``write_parquet`` holds the
outputs of tasks ``[g*G, (g+1)*G)``); selection works on whole groups, so a rank or a resumed
run always owns whole parts. Pure values: built in the main process, travel with the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSelection:
    """The part groups a run does: those of shard ``rank`` of ``world_size`` not in ``done_groups``.

    Groups are dealt to ranks round-robin: rank ``r`` owns groups ``r, r + world_size, ...``.

    >>> TaskSelection(tasks_per_group=2, rank=1, world_size=2).selects(2)
    True
    >>> TaskSelection(tasks_per_group=2, done_groups=frozenset({0})).selects(1)
    False
    """

    tasks_per_group: int = 1
    rank: int = 0
    world_size: int = 1
    done_groups: frozenset[int] = field(default_factory=frozenset)

    def group_of(self, task_key: int) -> int:
        return task_key // self.tasks_per_group

    def owns_group(self, group: int) -> bool:
        """Whether ``group`` belongs to this rank (done or not)."""
        return group % self.world_size == self.rank

    def selects(self, task_key: int) -> bool:
        group = self.group_of(task_key)
        return self.owns_group(group) and group not in self.done_groups
