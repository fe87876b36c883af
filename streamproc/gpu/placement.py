"""Model parallel: splitting a model over the devices of one GPU worker (a device group).

``set_processing(gpu_worker_devices=[("cuda:0", "cuda:1")])`` gives one GPU worker both
devices; :func:`place_modules` (called by :meth:`~streamproc.gpu.forward.DeviceForward.start`)
puts the parts of each model that ``forward`` uses on them. It runs in the process that runs
forward: a GPU worker, or the main process / a worker thread with the simple and threads
backends. torch is imported inside functions only.

The engine's rule (no ``place=`` hook):

* **Blocks.** For an ``nn.Sequential`` or ``nn.ModuleList`` the blocks are its children, in
  order. For any other module, the *layer stack* is the ``Sequential``/``ModuleList``
  submodule (at any depth, of two or more children) holding the most parameter and buffer
  bytes (the first in ``named_modules()`` order on a tie); the blocks are the children of the
  module and of each module on the path down to the stack, in registration order, with the
  stack replaced by its children. A BERT-like model gives ``embeddings, encoder.layer.0, ...,
  encoder.layer.11, pooler, classifier``; a model of ``embed``, ``layers`` (a ModuleList) and
  ``head`` gives ``embed, layers.0, ..., layers.N-1, head``. Parameters and buffers held
  directly by the module or by a module on that path (not by a block) go to the first device.
* **Balance.** Consecutive blocks go to consecutive devices, as the split of the blocks'
  bytes (parameters and buffers, a shared tensor counted once) that minimises the largest
  device's bytes (see :func:`balance`). Each device gets at least one block when there are
  at least as many blocks as devices.
* **Activations.** Each block gets a forward pre-hook that moves its tensor arguments to its
  device, so a plain ``nn.Sequential`` and a model whose ``forward`` loops over its layers
  both run unchanged; outputs leave from wherever the last block computed them. Tensors the
  model's own ``forward`` combines *between* blocks (e.g. a residual added outside the
  layers) are not moved: such a model needs ``place=``.
* **No structure.** A model without a layer stack (or with one block) goes whole to the first
  device, and a warning is logged (logger ``streamproc.gpu.placement``) naming the stage.

With ``map_gpu(..., place=fn)`` the engine calls ``fn(module, devices)`` (``devices``: a list of
``torch.device``) once per model instead, in every process that runs forward (also for a
single device), and then hooks the *units* it finds: the largest submodules whose parameters
and buffers all sit on one device. Either way the result is a :class:`Placement`, kept on the
runner (``DeviceForward.placements``) and logged at INFO. The rule's pure half (blocks,
balance, :class:`~.partition.Placement`) is :mod:`.partition`; this module moves tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

from ..errors import add_context_note
from ..options import DeviceSpec
from .device import map_tensors
from .partition import Placement, bytes_of, find_blocks, outermost, plan_placement, tensors_of

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: A user placement hook: ``place(module, devices)`` moves the module's parts to the devices.
PlaceHook = Callable[[Any, list[Any]], Any]

#: Attribute on a placed module holding its pre-hook handles, removed when it is placed again
#: (the simple backend places the user's own model object once per run).
_HOOKS_ATTR = "_streamproc_placement_hooks"


def group_devices(spec: DeviceSpec) -> tuple[str, ...]:
    """The device names of one ``gpu_worker_devices`` entry: a name, or a group of names.

    >>> group_devices("cuda:0"), group_devices(("cuda:0", "cuda:1"))
    (('cuda:0',), ('cuda:0', 'cuda:1'))
    """
    return (spec,) if isinstance(spec, str) else tuple(spec)


def first_device(spec: DeviceSpec) -> str:
    """Where a worker's inputs go: the device, or the first device of a group.

    This is also what :attr:`streamproc.WorkerInfo.device` says in a worker owning a group.
    """
    return group_devices(spec)[0]


def describe_device_spec(spec: DeviceSpec) -> str:
    """``"cuda:0"``, or ``"(cuda:0, cuda:1)"`` for a group (messages, ``explain()``)."""
    return spec if isinstance(spec, str) else f"({', '.join(spec)})"


# -- moving a model -----------------------------------------------------------------------------


def place_modules(
    modules: Sequence[Any], spec: DeviceSpec, stage: str, place: Optional[PlaceHook] = None
) -> list[Placement]:
    """Places each model of a stage on the worker's devices; returns one :class:`Placement` each.

    Runs in the process that runs forward, once, before the first batch (see
    :meth:`~streamproc.gpu.forward.DeviceForward.start`). A model that is a submodule of
    another one in ``modules`` is placed with it, not again. Every model ends in eval mode.

    Raises:
        ValueError: a tensor shared by two blocks would sit on two different devices; or the
            ``place`` hook left a parameter or buffer outside the worker's devices.
        Exception: whatever ``place`` raises, with notes naming the stage and the hook.
    """
    import torch

    names = group_devices(spec)
    devices = [_indexed(torch.device(name)) for name in names]
    placements = []
    for model in outermost(modules):
        if place is not None:
            placement = _place_by_hook(model, names, devices, stage, place)
        else:
            placement = _place_by_rule(model, names, devices, stage)
        model.eval()
        logger.info("streamproc: %s: %s placed over %s: %s", stage, placement.model,
                    describe_device_spec(spec), placement.describe())
        placements.append(placement)
    return placements


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as the ``cuda:N`` it means here (tensors report their device with an index)."""
    import torch

    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _place_by_rule(model: Any, names: tuple[str, ...], devices: list[torch.device], stage: str) -> Placement:
    model_name = type(model).__name__
    planned = plan_placement(model, names) if len(devices) > 1 else None
    if planned is None:
        if len(devices) > 1:
            logger.warning(
                "streamproc: %s: %s has no Sequential/ModuleList layer stack to split over %s: it runs whole on %s; "
                "pass map_gpu(..., place=fn) to place its parts yourself", stage, model_name,
                describe_device_spec(names), names[0],
            )
        model.to(devices[0])
        _install_hooks(model, [])  # inputs are on the first device already; drop a previous run's hooks
        return Placement(model_name, names, (("", 0),), (bytes_of(model, set()),))
    found = find_blocks(model)
    assert found is not None
    blocks, path = found
    indices = [index for _, index in planned.modules]
    _check_shared_tensors(blocks, indices, devices, stage, model_name)
    for _, container in path:
        _moveown_tensors(container, devices[0])
    for (_, block), index in zip(blocks, indices):
        block.to(devices[index])
    _install_hooks(model, [(block, devices[index]) for (_, block), index in zip(blocks, indices)])
    return planned


def _check_shared_tensors(
    blocks: list[tuple[str, Any]], indices: list[int], devices: list[torch.device], stage: str, model: str
) -> None:
    """Refuses a tensor shared by blocks that go to different devices (e.g. tied embeddings)."""
    owner: dict[int, tuple[str, int]] = {}
    for (name, block), index in zip(blocks, indices):
        for tensor in tensors_of(block):
            other = owner.setdefault(id(tensor), (name, index))
            if devices[other[1]] != devices[index]:
                raise ValueError(
                    f"{stage}: {model} shares a parameter or buffer between blocks {other[0]!r} and {name!r} (tied "
                    f"weights?), which the engine would put on {devices[other[1]]} and {devices[index]}: pass "
                    "map_gpu(..., place=fn) to place this model yourself"
                )


def _moveown_tensors(module: Any, device: torch.device) -> None:
    """Moves the parameters and buffers ``module`` holds itself (not its children's) to ``device``."""
    import torch

    with torch.no_grad():
        for _, param in list(module.named_parameters(recurse=False)):
            param.data = param.data.to(device)  # what Module.to does: the Parameter object stays
        for short, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[short] = buffer.to(device)


def _place_by_hook(
    model: Any, names: tuple[str, ...], devices: list[torch.device], stage: str, place: PlaceHook
) -> Placement:
    from ..ops import callable_name
    from ..stage_tags import tag_stage

    hook_name = callable_name(place)
    try:
        place(model, list(devices))
    except Exception as exc:
        tag_stage(exc, f"{stage}, place")
        add_context_note(
            exc, f"streamproc: raised by place={hook_name} placing {type(model).__name__} over "
            f"{describe_device_spec(names)} ({stage})",
        )
        raise
    units = _single_device_units(model)
    for unit_name, _, device in units:
        if device not in devices:
            raise ValueError(
                f"{stage}: place={hook_name} left {type(model).__name__}{'.' + unit_name if unit_name else ''} on "
                f"{device}, which is not one of this worker's devices {describe_device_spec(names)}: the hook must "
                "move every parameter and buffer to one of the devices it is given"
            )
    _install_hooks(model, [(unit, device) for _, unit, device in units])
    seen: set[int] = set()
    return Placement(
        type(model).__name__, names,
        tuple((name, devices.index(device)) for name, _, device in units),
        tuple(bytes_of(unit, seen) for _, unit, _ in units), by_hook=True,
    )


def _single_device_units(model: Any) -> list[tuple[str, Any, Any]]:
    """The largest submodules whose parameters and buffers all sit on one device, in order.

    Modules without tensors belong to no unit (their inputs are left where they are).
    """
    units: list[tuple[str, Any, Any]] = []

    def visit(name: str, module: Any) -> None:
        on = {tensor.device for tensor in tensors_of(module)}
        if len(on) == 1:
            units.append((name, module, on.pop()))
        elif on:
            for child_name, child in module.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return units


def _install_hooks(model: Any, targets: list[tuple[Any, torch.device]]) -> None:
    """Pre-hooks that move each target module's tensor arguments to its device (replacing old ones)."""
    for handle in getattr(model, _HOOKS_ATTR, ()):
        handle.remove()
    handles = [module.register_forward_pre_hook(_inputs_to(device), with_kwargs=True) for module, device in targets]
    object.__setattr__(model, _HOOKS_ATTR, handles)  # not a submodule or parameter: a plain attribute


def _inputs_to(device: torch.device) -> Callable[[Any, tuple[Any, ...], dict[str, Any]], tuple[Any, dict[str, Any]]]:
    def move_inputs(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return _moved(args, device), _moved(kwargs, device)

    return move_inputs


def _moved(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in a dict/list/tuple nesting on ``device`` (nothing else converted)."""
    return map_tensors(obj, lambda tensor: tensor.to(device), from_numpy=False)
