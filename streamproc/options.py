"""Processing options (``Stream.set_processing``) and their eager validation.

Validation happens when ``set_processing`` is called, in the main process: a bad value raises
``ValueError`` naming the parameter and what is allowed, never later at run time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from .batching import BatchBy, BatchSize, validate_batch_by
from .execution.error_policy import ON_ERROR_CHOICES

if TYPE_CHECKING:
    from .service.pool import WorkerPool

BACKENDS = ("simple", "threads", "multiprocessing", "ray")
START_METHODS = ("fork", "spawn", "forkserver")
AUTOCAST_DTYPES = ("float16", "bfloat16", "float32")
DEFAULT_BATCH_SIZE = BatchSize(128, "records")
DEFAULT_TASK_SIZE = 1024

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
_BYTE_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_BYTE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
MODEL_DTYPES = ("float16", "bfloat16", "float32")
#: What a :class:`~streamproc.WorkerPool` decides for the streams it runs (refused with ``pool=``).
POOL_OWNED_OPTIONS = ("num_cpu_workers", "num_gpu_workers", "gpu_worker_devices", "process_start_method")

#: One GPU worker's devices: a device name, or a group of names (model parallel: one worker
#: owns the group and the model is split across it).
DeviceSpec = Union[str, tuple[str, ...]]


@dataclass(frozen=True)
class ProcessingOptions:
    """How a stream runs. ``None`` means "derive a default at run time" (see :meth:`resolve`).

    ``task_size`` is the number of consecutive source records in one task (the unit handed to
    a worker); batches never span two tasks, which is what makes batch composition identical
    across backends and worker counts. Parquet sources use row groups as tasks instead.

    ``torch_threads`` is torch's intra-op thread count while ``forward`` runs, in whichever
    process runs it (see :attr:`forward_threads`). It is not capped here: how many threads
    a machine can run is for the backend to judge, like worker counts.

    Production jobs (design.md section 5): ``on_error``, ``dead_letter_path``, ``max_errors``
    (a count, or a fraction in (0, 1) of the records seen), ``max_task_retries``,
    ``task_timeout`` (seconds), ``shard`` (``"auto"`` or ``(rank, world_size)``).
    ``show_stats`` prints the run's stats report at its end.

    Models (design.md section 5): ``gpu_memory_budget`` (bytes per device, parsed from an int
    or a string like ``"20GB"``/``"16GiB"``; None: every model must fit), ``model_dtype``
    (weights cast once on the device: a torch dtype or its name; None: as loaded). An entry of
    ``gpu_worker_devices`` may be a tuple of devices: one GPU worker owning them all.

    Pools (design.md section 5): ``pool``, a :class:`~streamproc.WorkerPool` whose warm
    processes run the stream (the multiprocessing backend); it owns :data:`POOL_OWNED_OPTIONS`.

    ``ray_address`` (``backend="ray"``): None joins the cluster ``ray.init`` already joined,
    else starts a local one (it lives until the interpreter exits); ``"auto"`` or an address
    (``"10.0.0.1:6379"``, ``"ray://head:10001"``) joins that cluster.
    """

    backend: Optional[str] = None
    num_cpu_workers: Optional[int] = None
    num_gpu_workers: Optional[int] = None
    gpu_worker_devices: Optional[tuple[DeviceSpec, ...]] = None
    deterministic: bool = True
    batch_size: Optional[BatchSize] = None
    batch_by: BatchBy = None
    show_progress: bool = False
    autocast: Any = None
    process_start_method: Optional[str] = None
    task_size: Optional[int] = None
    torch_threads: Optional[int] = None
    on_error: str = "raise"
    dead_letter_path: Optional[str] = None
    max_errors: Optional[float] = None
    max_task_retries: int = 0
    task_timeout: Optional[float] = None
    shard: Any = None
    show_stats: bool = False
    gpu_memory_budget: Optional[int] = None
    model_dtype: Any = None
    ray_address: Optional[str] = None
    pool: Optional[WorkerPool] = None

    def updated(self, **changes: Any) -> ProcessingOptions:
        """Returns a copy with ``changes`` validated and applied."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"set_processing() got unknown option(s): {', '.join(sorted(unknown))}")
        updated = dataclasses.replace(self, **{k: _VALIDATORS[k](v) for k, v in changes.items()})
        updated._check_pool()
        return updated

    def _check_pool(self) -> None:
        """With ``pool=``: the options the pool owns are refused, and so is a backend other than multiprocessing."""
        if self.pool is None:
            return
        owned = [name for name in POOL_OWNED_OPTIONS if getattr(self, name) is not None]
        if owned:
            raise ValueError(
                f"set_processing(pool=...): {', '.join(owned)} belong(s) to the WorkerPool, which sets them "
                f"(WorkerPool({owned[0]}=...)); leave {'them' if len(owned) > 1 else 'it'} unset with pool="
            )
        if self.backend not in (None, "multiprocessing", getattr(self.pool, "backend_name", "multiprocessing")):
            raise ValueError(
                f"set_processing(pool=...) runs the stream on the pool's worker processes (backend 'multiprocessing'), "
                f"not backend={self.backend!r}: drop backend= or the pool"
            )

    def check_combination(self) -> None:
        """Raises ``ValueError`` for options that are valid alone but not together (at run time:
        ``set_processing`` calls may come in any order)."""
        if self.on_error == "dead_letter" and self.dead_letter_path is None:
            raise ValueError("on_error='dead_letter' needs dead_letter_path= (a directory for the dead-letter parquet parts)")
        if self.dead_letter_path is not None and self.on_error != "dead_letter":
            raise ValueError(f"dead_letter_path is set but on_error={self.on_error!r}: use on_error='dead_letter'")

    def changed_fields(self) -> dict[str, Any]:
        """The options that differ from the defaults (used by ``repr``)."""
        default = ProcessingOptions()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }

    @property
    def forward_threads(self) -> Optional[int]:
        """torch's intra-op threads while ``forward`` runs, in every backend (None: leave torch's).

        ``torch_threads`` when set; else 1 with ``deterministic=True``, the count workers run
        with, so that a CPU forward computes the same bits in the main process as in a
        worker (float reductions depend on how work is split across threads).
        """
        if self.torch_threads is not None:
            return self.torch_threads
        return 1 if self.deterministic else None

    @property
    def effective_gpu_workers(self) -> int:
        if self.num_gpu_workers is not None:
            return self.num_gpu_workers
        return len(self.gpu_worker_devices) if self.gpu_worker_devices else 0

    @property
    def effective_backend(self) -> str:
        """The backend to run: simple for one CPU worker and no GPU worker, else multiprocessing."""
        if self.pool is not None:  # a WorkerPool's processes, or a service's (sp.connect: "service")
            return str(getattr(self.pool, "backend_name", "multiprocessing"))
        if self.backend is not None:
            return self.backend
        if (self.num_cpu_workers or 1) > 1 or self.effective_gpu_workers > 0:
            return "multiprocessing"
        return "simple"


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> Any:
    if value is not None and value not in choices:
        raise ValueError(f"{name}={value!r} is invalid: expected one of {', '.join(map(repr, choices))} or None")
    return value


def _check_backend(value: Any) -> Optional[str]:
    _check_choice("backend", value, BACKENDS)
    if value == "ray" and not _ray_installed():
        raise ImportError("backend='ray' needs Ray, which is not installed: pip install 'streamproc[ray]'")
    return value


def _check_count(name: str, minimum: int):  # type: ignore[no-untyped-def]
    def check(value: Any) -> Optional[int]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum} or None, got {value!r}")
        return value

    return check


def _check_bool(name: str):  # type: ignore[no-untyped-def]
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        return value

    return check


def _check_devices(value: Any) -> Optional[tuple[DeviceSpec, ...]]:
    if value is None:
        return None
    # A list or tuple only: an int is not iterable, and an iterator would be consumed by the
    # check below and leave no devices.
    expected = (
        "gpu_worker_devices must be a non-empty list of device names like ['cuda:0', 'cpu'] "
        "(a tuple of names for one worker owning several devices, e.g. [('cuda:0', 'cuda:1')])"
    )
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{expected}, got {value!r}")
    specs: list[DeviceSpec] = []
    for entry in value:
        if isinstance(entry, str):
            specs.append(entry)
        elif isinstance(entry, (list, tuple)) and len(entry) >= 2 and all(isinstance(d, str) for d in entry):
            specs.append(tuple(entry))
        else:
            raise ValueError(f"{expected}; {entry!r} is neither a device name nor a tuple of two or more names")
    names = [d for spec in specs for d in ((spec,) if isinstance(spec, str) else spec)]
    bad = [d for d in names if not _DEVICE_RE.match(d)]
    if bad:
        raise ValueError(f"gpu_worker_devices: {bad!r} not understood; use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return tuple(specs)


def device_names(specs: tuple[DeviceSpec, ...]) -> list[str]:
    """Every device name in ``gpu_worker_devices``, groups flattened, in order."""
    return [d for spec in specs for d in ((spec,) if isinstance(spec, str) else spec)]


def parse_byte_size(name: str, value: Any) -> Optional[int]:
    """Bytes from an int or a string like ``"20GB"`` (10^9), ``"16GiB"`` (2^30), ``"512MB"``.

    Raises:
        ValueError: naming ``name``, for anything else (a bool, a negative or zero size, an
            unknown unit).
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = _BYTE_SIZE_RE.match(value)
        if match:
            number, unit = float(match.group(1)), (match.group(2) or "B").lower()
            size = int(number * _BYTE_UNITS[unit])
            if size > 0:
                return size
    raise ValueError(
        f"{name} must be a positive number of bytes (an int, or a string like '20GB' or '16GiB'; "
        f"GB is 10^9 bytes, GiB 2^30) or None, got {value!r}"
    )


def _check_model_dtype(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value in MODEL_DTYPES):
        return value
    # A torch.dtype, recognised without importing torch (the core must not import it).
    is_dtype = type(value).__module__ == "torch" and type(value).__name__ == "dtype"
    if is_dtype and str(value).removeprefix("torch.") in MODEL_DTYPES:
        return value
    raise ValueError(
        f"model_dtype must be None, torch.float16, torch.bfloat16, torch.float32 or one of their names, got {value!r}"
    )


def _check_batch_size(value: Any) -> Optional[BatchSize]:
    return None if value is None else BatchSize.parse(value)


def _check_autocast(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in AUTOCAST_DTYPES:
        return value
    # A torch.dtype, recognised without importing torch (the core must not import it).
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return value
    raise ValueError(f"autocast must be None, True/False, a torch.dtype or one of {', '.join(AUTOCAST_DTYPES)}, got {value!r}")


def _check_path(name: str):  # type: ignore[no-untyped-def]
    def check(value: Any) -> Optional[str]:
        if value is None:
            return None
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise ValueError(f"{name} must be a directory path or None, got {value!r}")
        return str(os.fspath(value))

    return check


def _check_max_errors(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, float) and 0.0 < value < 1.0:
        return value
    raise ValueError(
        f"max_errors must be an int >= 0 (a count), a float in (0, 1) (a fraction of the records seen) or None, got {value!r}"
    )


def _check_seconds(name: str):  # type: ignore[no-untyped-def]
    def check(value: Any) -> Optional[float]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
        return float(value)

    return check


def _ray_installed() -> bool:
    """Whether Ray can be imported (looked up, not imported: importing it takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("ray") is not None
    except ValueError:  # sys.modules["ray"] is None: imports of it are blocked
        return False


def _check_ray_address(value: Any) -> Optional[str]:
    """None, ``"auto"`` or a non-empty address string (``host:port`` or a ``ray://`` URL)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
        raise ValueError(
            f"ray_address must be None (the cluster ray.init joined, else a local one), 'auto' or a cluster "
            f"address such as '10.0.0.1:6379' or 'ray://head:10001', got {value!r}"
        )
    return value.strip()


def _check_shard(value: Any) -> Any:
    if value is None or value == "auto":
        return value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and value[1] >= 1
        and 0 <= value[0] < value[1]
    ):
        return (value[0], value[1])
    raise ValueError(f"shard must be None, 'auto' or (rank, world_size) with 0 <= rank < world_size, got {value!r}")


def _check_pool(value: Any) -> Optional[WorkerPool]:
    if value is None:
        return None
    # A class attribute, not an isinstance check: importing the pool here would make a cycle
    # (the pool imports the backend, which imports these options).
    if not getattr(type(value), "is_streamproc_pool", False):
        raise ValueError(
            f"pool must be a streamproc.WorkerPool, a pool of sp.connect(...) or None, got {type(value).__name__}: {value!r:.80}"
        )
    return value


_VALIDATORS = {
    "backend": _check_backend,
    "num_cpu_workers": _check_count("num_cpu_workers", 1),
    "num_gpu_workers": _check_count("num_gpu_workers", 0),
    "gpu_worker_devices": _check_devices,
    "deterministic": _check_bool("deterministic"),
    "batch_size": _check_batch_size,
    "batch_by": validate_batch_by,
    "show_progress": _check_bool("show_progress"),
    "autocast": _check_autocast,
    "process_start_method": lambda v: _check_choice("process_start_method", v, START_METHODS),
    "task_size": _check_count("task_size", 1),
    "torch_threads": _check_count("torch_threads", 1),
    "on_error": lambda v: _check_choice("on_error", v if v is not None else "raise", ON_ERROR_CHOICES),
    "dead_letter_path": _check_path("dead_letter_path"),
    "max_errors": _check_max_errors,
    "max_task_retries": lambda v: _check_count("max_task_retries", 0)(v) or 0,
    "task_timeout": _check_seconds("task_timeout"),
    "shard": _check_shard,
    "show_stats": _check_bool("show_stats"),
    "gpu_memory_budget": lambda v: parse_byte_size("gpu_memory_budget", v),
    "model_dtype": _check_model_dtype,
    "ray_address": _check_ray_address,
    "pool": _check_pool,
}
