"""What a model is made of: its tensors, their content digest, and their bytes and dtypes on a device.

Pure functions over a ``torch.nn.Module``, used by :mod:`.model_cache`; they run where the
cache runs (where forward runs). torch is imported inside functions only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch


def format_bytes(nbytes: int) -> str:
    """``"90,177,536 bytes (90.2 MB)"``: exact, and readable (MB = 10^6 bytes, as "GB" options).

    >>> format_bytes(1_500_000)
    '1,500,000 bytes (1.5 MB)'
    """
    return f"{nbytes:,} bytes ({nbytes / 1e6:.1f} MB)"


def named_tensors(module: Any) -> list[tuple[str, str, Any]]:
    """``(kind, name, tensor)`` for every parameter and buffer of ``module``, each tensor once
    (a tied weight appears under its first name), in ``named_parameters`` then ``named_buffers``
    order."""
    found = [("parameter", name, p) for name, p in module.named_parameters()]
    found += [("buffer", name, b) for name, b in module.named_buffers() if b is not None]
    return found


def model_digest(module: Any) -> str:
    """The content digest of a module: SHA-256 (hex) over its parameters and buffers.

    Hashed per tensor, in :func:`named_tensors` order: the kind, dotted name, shape and dtype,
    then the raw bytes of the values (a tensor on a device is copied to the host first). So two
    modules digest equal exactly when every tensor has the same name, shape, dtype and bytes;
    the module's class and Python attributes are not part of it (forward runs each module's own
    code; only the tensors are shared). SHA-256 rather than BLAKE2b: CPUs with SHA extensions
    hash it faster (measured on the shared 2-core development machine, under load: 0.3-0.9 s
    for a 90 MB model; BLAKE2b took 0.5-1.8 s for 90 MB of bytes). It runs once per process
    and model, at start-up.
    """
    import hashlib  # lazily: OpenSSL is 3.7 MB of RSS in every forked worker (issue 10, memory row)

    import torch

    digest = hashlib.sha256()
    for kind, name, tensor in named_tensors(module):
        value = tensor.detach()
        digest.update(f"{kind} {name} {tuple(value.shape)} {value.dtype}\n".encode())
        if value.numel():
            host = value.to("cpu").contiguous().reshape(-1)
            digest.update(host.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def keeps_fp32(name: str, module: Any) -> bool:
    """Whether the parameter or buffer ``name`` of the top-level ``module`` stays float32.

    Hugging Face transformers' convention: a model lists submodule names in its
    ``_keep_in_fp32_modules`` attribute, and a tensor stays fp32 when one of its dotted name's
    components is one of them (``"encoder.layer_norm.weight"`` for ``["layer_norm"]``).
    """
    keep = getattr(module, "_keep_in_fp32_modules", None) or ()
    return any(part in keep for part in name.split("."))


def target_dtype(name: str, tensor: Any, module: Any, dtype: Optional[torch.dtype]) -> Any:
    """The dtype ``tensor`` (``name`` in ``module``) has on the device under ``model_dtype=dtype``.

    Only floating-point tensors are cast; integer and boolean buffers (position ids, masks)
    keep theirs; kept modules (:func:`keeps_fp32`) become float32.
    """
    import torch

    if dtype is None or not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if keeps_fp32(name, module) else dtype


def model_nbytes(module: Any, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of ``module``'s parameters and buffers on the device under ``model_dtype=dtype``."""
    return sum(
        tensor.numel() * target_dtype(name, tensor, module, dtype).itemsize for _, name, tensor in named_tensors(module)
    )


def outermost_modules(modules: Iterable[Any]) -> list[Any]:
    """``modules`` without those that are submodules of another one (each counted once)."""
    listed = list(modules)
    inner = {id(sub) for module in listed for sub in module.modules() if sub is not module}
    return [module for module in listed if id(module) not in inner]


def cast_weights(module: Any, dtype: Optional[torch.dtype]) -> None:
    """Casts ``module``'s floating-point tensors to ``dtype`` where they are (kept ones: fp32)."""
    if dtype is None:
        return
    for _, name, tensor in named_tensors(module):
        wanted = target_dtype(name, tensor, module, dtype)
        if tensor.dtype != wanted:
            tensor.data = tensor.data.to(wanted)


def share_tensors(follower: Any, source: Any) -> None:
    """Makes ``follower``'s parameters and buffers views of ``source``'s (equal content)."""
    tensors = {(kind, name): tensor for kind, name, tensor in named_tensors(source)}
    for kind, name, tensor in named_tensors(follower):
        tensor.data = tensors[(kind, name)].data
    follower.eval()
