"""CPU torch tensors in messages, pickled as their raw bytes (every process that sends messages).

torch's own pickling of a tensor goes through ``torch.serialization`` (a storage object, its
legacy loader, ``Tensor.set_``): about 0.1 ms to dump and as much to load even for 16
numbers, which a GPU worker pays twice per batch. A plain CPU tensor that is contiguous is
sent here as its dtype, shape and bytes (a pickle protocol 5 buffer) and rebuilt with
``torch.frombuffer``, in microseconds; only the tensor's own elements travel, not the rest of
the storage it may be a view of. Everything else keeps torch's pickling, which preserves what
this does not: strides (a non-contiguous view), autograd, subclasses such as
``nn.Parameter``, sparse or quantized layouts, names, conjugate and negative bits, and
non-CPU devices. Large tensors between CPU and GPU workers go through shared memory instead
(:mod:`streamproc.backends.multiprocessing.tensor_transport`). torch is never imported here:
a process that has not imported it has no tensor to send.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import sys
from typing import Any


def _rebuild_tensor(data: Any, dtype: Any, shape: tuple[int, ...]) -> Any:
    """Inverse of :func:`reduce_tensor` (the receiving process; ``data`` is a writable bytearray)."""
    import torch

    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)


def reduce_tensor(obj: Any) -> Any:
    """The reduction of an exact ``torch.Tensor``: the fast one for a plain, contiguous, non-empty
    CPU tensor, else torch's own (``__reduce_ex__``)."""
    import torch

    if (
        obj.device.type != "cpu"
        or obj.layout is not torch.strided
        or obj.requires_grad
        or obj.is_quantized
        or obj.is_conj()
        or obj.is_neg()
        or any(name is not None for name in getattr(obj, "names", ()))  # named tensors, where torch has them
        or not obj.is_contiguous()
        or obj.numel() == 0
    ):
        return obj.__reduce_ex__(PROTOCOL)
    raw = obj.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes, no copy
    return _rebuild_tensor, (pickle.PickleBuffer(raw), obj.dtype, tuple(obj.shape))


#: Protocol 5: out-of-band capable buffers, pickled in band here as one copy of the bytes.
PROTOCOL = 5
_dispatch_table: dict[Any, Any] = {}


def dumps_with_prefix(prefix: bytes, message: Any) -> bytes:
    """``prefix`` followed by the pickle of ``message`` (standard pickle, protocol 5).

    Once torch is imported in this process, exact ``torch.Tensor`` instances go through
    :func:`reduce_tensor` (a ``dispatch_table`` entry, looked up in C by exact type: records
    of ints, strings, lists and dicts pay nothing for it, and subclasses such as
    ``nn.Parameter`` keep torch's pickling). The table copies ``copyreg.dispatch_table``, again
    whenever entries were registered since, so a user's ``copyreg.pickle`` reducers still apply.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return prefix + pickle.dumps(message, protocol=PROTOCOL)
    if len(_dispatch_table) != len(copyreg.dispatch_table) + 1:  # first use, or copyreg.pickle() since
        _dispatch_table.clear()
        _dispatch_table.update(copyreg.dispatch_table)
        _dispatch_table[torch.Tensor] = reduce_tensor
    buffer = io.BytesIO()
    buffer.write(prefix)
    pickler = pickle.Pickler(buffer, protocol=PROTOCOL)
    pickler.dispatch_table = _dispatch_table
    pickler.dump(message)
    return buffer.getvalue()
