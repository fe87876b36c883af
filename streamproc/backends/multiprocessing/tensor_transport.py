"""Large tensors between CPU and GPU workers through shared memory instead of the pipes.

Runs in CPU workers and GPU workers (both ends of a batch or output message), and in the main
process (:func:`sweep_segments` after a run's workers are gone). The sender
(:func:`pack`) copies each CPU tensor of at least :data:`SHM_MIN_BYTES` into a new segment of
``/dev/shm`` and puts a small :class:`ShmTensor` in its place in the message; the receiver
(:func:`unpack`) maps the segment, **unlinks it at once** and wraps the mapping as a tensor
(no second copy: the mapping lives as long as the tensor). Ownership of a segment passes with
its message, so:

* a message that cannot be sent (its peer is gone, its pickling failed) has its segments
  unlinked by the sender (:func:`discard`);
* an answer nobody waits for any more (its task failed) is unpacked and dropped;
* a process killed with segments in flight (sent but not yet read, or created but not yet
  sent) leaves them behind: their names are ``streamproc-<main pid>-<creator pid>-<n>``, and
  the main process unlinks those whose creator is dead once the run's workers are gone
  (:func:`sweep_segments`).

Why a threshold: below it, pickling through the pipe costs less than creating, sizing,
mapping and unlinking a segment (measured by ``benchmarks/bench_transport.py``; figures in
docs/benchmarks.md, "Tensor transport"). Where ``/dev/shm`` does not exist (not Linux), every
tensor goes through the pipe.
"""

from __future__ import annotations

import itertools
import mmap
import os
from dataclasses import dataclass
from typing import Any, Optional

#: Tensors of at least this many bytes travel through shared memory: the crossover measured by
#: benchmarks/bench_transport.py on the project's 2-core machine (shm faster at 16 MiB and
#: above, twice; slower at 1-4 MiB, where fresh pages are faulted in on both sides; see
#: docs/benchmarks.md, "Tensor transport").
SHM_MIN_BYTES = 16 << 20
#: Where POSIX shared memory segments live as files (Linux).
SHM_DIR = "/dev/shm"
#: Every segment's name starts with this, then the main process's pid.
SEGMENT_PREFIX = "streamproc-"

_counter = itertools.count()


@dataclass(frozen=True)
class ShmTensor:
    """Stands for a tensor in a message: the segment ``name`` holds its ``span`` elements.

    The tensor is ``as_strided(flat, size, stride)`` over the segment's elements (a view keeps
    its strides; only the storage span it covers is copied).
    """

    name: str
    dtype: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    span: int


def shm_available() -> bool:
    """Whether this machine has ``/dev/shm`` (else every tensor goes through the pipe)."""
    return os.path.isdir(SHM_DIR)


_AVAILABLE = shm_available()


def segment_owner_prefix(main_pid: int) -> str:
    """The name prefix of every segment made for the run of main process ``main_pid``."""
    return f"{SEGMENT_PREFIX}{main_pid}-"


def pack(obj: Any, main_pid: int, min_bytes: int = SHM_MIN_BYTES) -> tuple[Any, list[str]]:
    """``obj`` with its large CPU tensors moved to new segments, and the segments' names.

    Runs in the process that sends ``obj`` (CPU worker: a batch; GPU worker: outputs). Walks
    dict/list/tuple nestings (as ``map_tensors`` does); other leaves, GPU tensors, sparse or
    quantized tensors and tensors with a negative stride are left for the pipe. On failure,
    the segments already made are unlinked before the error propagates.
    """
    if not _AVAILABLE or "torch" not in _imported():
        return obj, []
    made: list[str] = []
    try:
        return _pack(obj, main_pid, min_bytes, made), made
    except BaseException:
        discard_names(made)
        raise


def _imported() -> Any:
    import sys

    return sys.modules  # a batch holds torch tensors only if torch is imported here


def _pack(obj: Any, main_pid: int, min_bytes: int, made: list[str]) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return _to_segment(obj, main_pid, made) if _worth_a_segment(obj, min_bytes) else obj
    if isinstance(obj, dict):
        return {k: _pack(v, main_pid, min_bytes, made) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_pack(v, main_pid, min_bytes, made) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v, main_pid, min_bytes, made) for v in obj)
    return obj


def _worth_a_segment(tensor: Any, min_bytes: int) -> bool:
    import torch

    return (
        tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and not tensor.requires_grad
        and tensor.numel() * tensor.element_size() >= min_bytes
        and all(s >= 0 for s in tensor.stride())
    )


def _span(size: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements of storage a view of ``size`` and ``stride`` covers (0 for an empty tensor)."""
    if any(n == 0 for n in size):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(size, stride))


def _to_segment(tensor: Any, main_pid: int, made: list[str]) -> ShmTensor:
    import torch

    size, stride = tuple(tensor.shape), tuple(tensor.stride())
    span = _span(size, stride)
    nbytes = span * tensor.element_size()
    name = f"{segment_owner_prefix(main_pid)}{os.getpid()}-{next(_counter)}"
    fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    made.append(name)
    try:
        os.ftruncate(fd, nbytes)
        with mmap.mmap(fd, nbytes) as mapping:
            flat = torch.frombuffer(mapping, dtype=tensor.dtype, count=span)
            flat.copy_(torch.as_strided(tensor, (span,), (1,), tensor.storage_offset()))
            del flat  # the mapping cannot close while a tensor exports it
    finally:
        os.close(fd)
    return ShmTensor(name, str(tensor.dtype).removeprefix("torch."), size, stride, span)


def unpack(obj: Any) -> Any:
    """``obj`` with each :class:`ShmTensor` replaced by its tensor; every segment is unlinked.

    Runs in the process that received ``obj``. The tensors are views of the mappings (no
    copy); they are writable. A segment that cannot be opened (swept after its run ended)
    raises FileNotFoundError after the others were unlinked.
    """
    if not _AVAILABLE or "torch" not in _imported():
        return obj
    failed: list[BaseException] = []
    result = _unpack(obj, failed)
    if failed:
        raise failed[0]
    return result


def _unpack(obj: Any, failed: list[BaseException]) -> Any:
    if isinstance(obj, ShmTensor):
        try:
            return _from_segment(obj)
        except OSError as exc:
            failed.append(exc)
            return None
    if isinstance(obj, dict):
        return {k: _unpack(v, failed) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_unpack(v, failed) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v, failed) for v in obj)
    return obj


def _from_segment(handle: ShmTensor) -> Any:
    import torch

    path = os.path.join(SHM_DIR, handle.name)
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)  # the mapping outlives the name: nothing is left to leak from here on
        dtype = getattr(torch, handle.dtype)
        if handle.span == 0:
            return torch.empty_strided(handle.size, handle.stride, dtype=dtype)
        mapping = mmap.mmap(fd, handle.span * torch.empty((), dtype=dtype).element_size())
    finally:
        os.close(fd)
    flat = torch.frombuffer(mapping, dtype=dtype, count=handle.span)  # keeps the mapping alive
    return torch.as_strided(flat, handle.size, handle.stride)


def discard(obj: Any) -> None:
    """Unlinks the segments of a packed message that will never be unpacked (never raises)."""
    discard_names(names_in(obj))


def names_in(obj: Any) -> list[str]:
    """The segment names of the :class:`ShmTensor` handles in ``obj``."""
    if isinstance(obj, ShmTensor):
        return [obj.name]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [name for item in obj for name in names_in(item)]
    return []


def discard_names(names: list[str]) -> None:
    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except OSError:
            pass


def sweep_segments(main_pid: Optional[int] = None) -> list[str]:
    """Unlinks the segments of main process ``main_pid``'s runs whose creator is no longer alive.

    Runs in the main process, after a run's workers were joined. A segment of a dead creator
    is either still in a pipe to a peer that will find it gone (its answer or batch then
    fails, as the creator's death fails its task anyway) or lost for good; a segment of a live
    creator (another pool's worker) is left alone. Returns the names it removed.
    """
    if not _AVAILABLE:
        return []
    prefix = segment_owner_prefix(os.getpid() if main_pid is None else main_pid)
    try:
        names = [name for name in os.listdir(SHM_DIR) if name.startswith(prefix)]
    except OSError:
        return []
    orphans = [name for name in names if not _is_alive(name[len(prefix):].split("-", 1)[0])]
    discard_names(orphans)
    return orphans


def _is_alive(pid_text: str) -> bool:
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
