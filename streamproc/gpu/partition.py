"""The engine's model-parallel split, as pure functions: blocks, balance, :class:`Placement`.

The rule is stated in :mod:`streamproc.gpu.placement`, which moves the model accordingly.
Nothing here moves a tensor: :func:`plan_placement` also runs in the main process, for
``explain()``. torch is imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Placement:
    """Where the parts of one model went, in model order.

    Attributes:
        model: the model's class name.
        devices: the worker's devices, in order (a group may name "cpu" twice).
        modules: ``(qualified module name, index into devices)`` per block (engine rule) or
            per unit (``place=`` hook), in ``named_modules()`` order; ``""`` is the model itself.
        sizes: the bytes of parameters and buffers of each entry of ``modules``.
        first_device_tensors: names of parameters and buffers held by the model or by a module
            on the path to its layer stack rather than by a block: they are on the first device.
        by_hook: whether the user's ``place`` hook placed the model.
    """

    model: str
    devices: tuple[str, ...]
    modules: tuple[tuple[str, int], ...]
    sizes: tuple[int, ...]
    first_device_tensors: tuple[str, ...] = ()
    by_hook: bool = False

    def as_dict(self) -> dict[str, str]:
        """Module name -> device name."""
        return {name: self.devices[index] for name, index in self.modules}

    def bytes_per_device(self) -> list[int]:
        """The bytes placed on each device (blocks and units only), by device index."""
        totals = [0] * len(self.devices)
        for (_, index), size in zip(self.modules, self.sizes):
            totals[index] += size
        return totals

    def describe(self) -> str:
        """One line: ``"embed, layers.0 -> cuda:0 [0]; layers.1, head -> cuda:1 [1]"``."""
        parts = []
        for index, device in enumerate(self.devices):
            names = [name or "(the model)" for name, at in self.modules if at == index]
            if names:
                parts.append(f"{', '.join(names)} -> {device} [{index}]")
        return "; ".join(parts)


def balance(sizes: Sequence[int], num_devices: int) -> list[int]:
    """The device index of each block: consecutive runs, the largest device load minimal.

    Among the splits into ``min(num_devices, len(sizes))`` non-empty consecutive runs, it takes
    the ones whose largest run (sum of ``sizes``) is smallest, then among those the most even
    (smallest sum of squared loads), then the one with the latest cuts (so a block without
    parameters, like an activation, stays with the block before it).

    >>> balance([1, 1, 1, 1], 2)
    [0, 0, 1, 1]
    >>> balance([10, 1, 1, 1], 3)
    [0, 1, 1, 2]
    >>> balance([4, 0, 4, 0], 2)
    [0, 0, 1, 1]
    >>> balance([5, 5], 3)
    [0, 1]

    Runs in O(k n^2) for n blocks and k devices (two dynamic programs over prefix sums).
    """
    n = len(sizes)
    if num_devices < 1:
        raise ValueError(f"balance: num_devices must be at least 1, got {num_devices}")
    k = min(num_devices, n)
    if k == 0:
        return []
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    inf = float("inf")
    # worst[j][i]: the smallest largest load putting the first i blocks on j devices.
    worst = [[inf] * (n + 1) for _ in range(k + 1)]
    worst[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            worst[j][i] = min(max(worst[j - 1][c], prefix[i] - prefix[c]) for c in range(j - 1, i))
    bound = worst[k][n]
    # squares[j][i]: the smallest sum of squared loads with every load <= bound; cut[j][i]: the
    # start of device j-1's run in that split (the latest on a tie).
    squares = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    squares[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for c in range(j - 1, i):
                load = prefix[i] - prefix[c]
                if load <= bound and squares[j - 1][c] + load * load <= squares[j][i]:
                    squares[j][i] = squares[j - 1][c] + load * load
                    cut[j][i] = c
    devices = [0] * n
    end = n
    for j in range(k, 0, -1):
        start = cut[j][end]
        devices[start:end] = [j - 1] * (end - start)
        end = start
    return devices


def find_blocks(model: Any) -> Optional[tuple[list[tuple[str, Any]], list[tuple[str, Any]]]]:
    """The blocks of ``model`` and the modules on the path to its layer stack (the rule: :mod:`streamproc.gpu.placement`).

    Returns:
        ``(blocks, path)``: ``(qualified name, module)`` pairs; ``path`` starts with
        ``("", model)``. None when ``model`` has no layer stack (nothing to split).
    """
    import torch

    containers = (torch.nn.Sequential, torch.nn.ModuleList)
    if isinstance(model, containers):
        return list(model.named_children()), [("", model)]
    stacks = [(name, m) for name, m in model.named_modules() if name and isinstance(m, containers) and len(m) >= 2]
    if not stacks:
        return None
    sizes = [bytes_of(m, set()) for _, m in stacks]
    stack_name = stacks[sizes.index(max(sizes))][0]
    blocks: list[tuple[str, Any]] = []
    path: list[tuple[str, Any]] = [("", model)]
    parent, prefix = model, ""
    steps = stack_name.split(".")
    for depth, step in enumerate(steps):
        for name, child in parent.named_children():
            if name != step:
                blocks.append((prefix + name, child))  # a sibling of the path: one block
        parent, prefix = parent.get_submodule(step), f"{prefix}{step}."
        if depth < len(steps) - 1:
            path.append((prefix[:-1], parent))
    blocks += [(prefix + name, layer) for name, layer in parent.named_children()]  # the stack's layers
    # Blocks were appended level by level; put them back in named_modules() order.
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    blocks.sort(key=lambda item: order.get(item[0], len(order)))
    return blocks, path


def tensors_of(module: Any, recurse: bool = True) -> list[Any]:
    """The parameters and buffers of ``module`` (of its submodules too, with ``recurse``)."""
    return [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]


def bytes_of(module: Any, seen: set[int], recurse: bool = True) -> int:
    """Bytes of the parameters and buffers of ``module`` not in ``seen`` (which it extends)."""
    total = 0
    for tensor in tensors_of(module, recurse):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def plan_placement(model: Any, devices: Sequence[str]) -> Optional[Placement]:
    """The engine's split of ``model`` over ``devices``, without moving anything.

    Returns None when ``model`` cannot be split (no layer stack, or a single block). Pure:
    it also runs in the main process, for ``explain()``.
    """
    found = find_blocks(model)
    if found is None or len(found[0]) < 2:
        return None
    blocks, path = found
    seen: set[int] = set()
    first = []
    for path_name, container in path:  # tensors held on the path are not the blocks'
        bytes_of(container, seen, recurse=False)
        first += [f"{path_name}.{short}" if path_name else short for short, _ in own_tensors(container)]
    sizes = [bytes_of(block, seen) for _, block in blocks]
    indices = balance(sizes, len(devices))
    modules = tuple((name, index) for (name, _), index in zip(blocks, indices))
    return Placement(type(model).__name__, tuple(devices), modules, tuple(sizes), tuple(first))


def own_tensors(module: Any) -> list[tuple[str, Any]]:
    """The ``(name, tensor)`` parameters and buffers ``module`` holds itself, not its children."""
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def outermost(modules: Sequence[Any]) -> list[Any]:
    """``modules`` less those that are a submodule of another one (placed with it)."""
    inside = {id(sub) for model in modules for sub in list(model.modules())[1:]}
    return [model for model in modules if id(model) not in inside]
