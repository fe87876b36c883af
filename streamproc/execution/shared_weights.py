"""Model weights shipped once: large tensors travel beside a worker's plan, not inside it.

NOTE [ streamproc weights shipping ]
    A plan is pickled once per run and its bytes go to every worker (see
    :mod:`.serialization`). Pickled by value, a 90 MB model costs each worker 90 MB of pipe
    and an unpickle, before its first output. Instead, while the plan is pickled, every
    parameter and buffer of a ``torch.nn.Module`` met, of at least
    :data:`SHIPPED_TENSOR_MIN_BYTES`, is replaced by a reference (a pickle *persistent id*),
    which the worker resolves when it loads the plan:

    * **inherited** (the loading worker is forked after the plan was pickled: a run without
      a warm pool, start method fork): the main process keeps the tensor in a registry
      (:data:`_INHERITED`) that the forked child sees; nothing is written or copied.
    * **file** (spawn, forkserver, and every warm pool, whose processes exist already): the
      tensors are written once with ``torch.save`` (no CRC) to a file in a directory of
      this process (:func:`weights_root`), and each worker loads it with
      ``torch.load(mmap=True)``: the pages are the page cache's, shared by every worker, so
      start-up does not grow with the worker count. The mapping is private: a worker's
      in-place change stays in that worker.

    Keys are content keys (:func:`~streamproc.gpu.model_content.model_digest` of the module,
    then the tensor's name), so equal models (one object reached by two stages, or two
    copies) are written once per run, or once per warm pool: a pool's :class:`WeightShipper`
    lives as long as the pool and remembers what it wrote; its workers keep what they loaded
    (:data:`_LOADED`) and reload a file only if a run changed the tensor in place.

    Files are removed when the run ends (every path: :meth:`_Run.shutdown` runs on success,
    error, a crashed worker and Ctrl-C), when a warm pool closes, at garbage collection and
    at interpreter exit; a directory left by a main process that was killed is removed by the
    next one that ships weights (:func:`_remove_stale_dirs`).

Mutation semantics are those of pickling by value: a worker's change to a weight never
reaches the main process nor another worker (fork: copy-on-write; file: private mapping).
Runs in the main process (:class:`WeightShipper`) and in workers (:func:`resolve_weight`);
torch is imported only when a tensor is met.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import weakref
from typing import TYPE_CHECKING, Any, Optional

from ..errors import SerializationError

if TYPE_CHECKING:
    import torch

#: A parameter or buffer at least this large travels by reference; smaller ones stay in the
#: plan (a reference costs about 150 bytes, and a file read more than a few small tensors).
SHIPPED_TENSOR_MIN_BYTES = 64 * 1024
#: Overrides the directory weight files are written under (default: /dev/shm when it has room
#: for twice the weights, else the system's temporary directory).
WEIGHTS_DIR_ENV = "STREAMPROC_WEIGHTS_DIR"
#: Weight directories are named ``<prefix><pid>-<random>``: the pid tells a stale one.
WEIGHTS_DIR_PREFIX = "streamproc-weights-"
_SHM_ROOT = "/dev/shm"
_REF_TAG = "streamproc-weight-v1"
_STALE_DIR = re.compile(re.escape(WEIGHTS_DIR_PREFIX) + r"(\d+)-")

#: Main process -> forked workers: key -> tensor, filled before the fork (see the NOTE).
_INHERITED: dict[str, Any] = {}
#: Worker: key -> (tensor loaded from its file, its version then): reused by later plans.
_LOADED: dict[str, tuple[Any, int]] = {}
#: Worker: path -> the tensors of that file (its mapping), loaded once.
_FILES: dict[str, dict[str, Any]] = {}
_loaded_lock = threading.Lock()

#: A persistent id: ``(tag, key, path or None when inherited, is a Parameter, requires_grad)``.
WeightRef = tuple[str, str, Optional[str], bool, bool]


def weights_root(nbytes: int = 0) -> str:
    """Where weight directories go (main process): ``$STREAMPROC_WEIGHTS_DIR``, else /dev/shm
    when it has room for twice ``nbytes``, else :func:`tempfile.gettempdir` (page cache)."""
    chosen = os.environ.get(WEIGHTS_DIR_ENV)
    if chosen:
        return chosen
    try:
        stat = os.statvfs(_SHM_ROOT)
        if os.access(_SHM_ROOT, os.W_OK) and stat.f_bavail * stat.f_frsize >= 2 * nbytes:
            return _SHM_ROOT
    except OSError:
        pass
    return tempfile.gettempdir()


def _remove_stale_dirs(root: str) -> None:
    """Removes weight directories under ``root`` whose process is gone (a killed main process)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        match = _STALE_DIR.match(name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except OSError:  # alive, another user's
            continue


class _Files:
    """The directory of one :class:`WeightShipper` and what was written there (under its lock).

    Separate from the shipper so that ``weakref.finalize`` can remove it without the shipper.
    """

    def __init__(self) -> None:
        self.dir: Optional[str] = None
        self.inherited: set[str] = set()

    def remove(self) -> None:
        for key in self.inherited:
            _INHERITED.pop(key, None)
        self.inherited.clear()
        directory, self.dir = self.dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


class WeightShipper:
    """The weights of one run's plans (or of one warm pool's runs), each shipped once. Main process.

    :meth:`pickling` gives the hook that one ``dumps`` of a plan uses; :meth:`close` removes
    every file written and every inherited entry (idempotent; also at garbage collection and
    interpreter exit). See NOTE [ streamproc weights shipping ].
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files = _Files()
        self._written: dict[str, str] = {}  # key -> file holding it
        self._count = 0
        #: Bytes written to weight files, and the files, since the shipper was made.
        self.bytes_written = 0
        self.files_written = 0
        self._finalizer = weakref.finalize(self, self._files.remove)

    @property
    def directory(self) -> Optional[str]:
        """The directory of this shipper's files (None until one is written)."""
        return self._files.dir

    def pickling(self, inherit: bool) -> _PlanPickling:
        """The hook for one pickling of a plan: ``inherit`` when every process that loads it
        is forked from this one afterwards (see the NOTE); else weights go to a file."""
        return _PlanPickling(self, inherit)

    def close(self) -> None:
        """Removes this shipper's files and inherited entries (workers that mapped them keep their pages)."""
        with self._lock:
            self._written.clear()
            self._finalizer()

    # -- for _PlanPickling, under the lock ----------------------------------------------------
    def _inherit(self, key: str, tensor: Any) -> None:
        _INHERITED[key] = tensor
        self._files.inherited.add(key)

    def _write(self, tensors: dict[str, Any], path: str) -> None:
        _write_file(path, tensors)
        for key in tensors:
            self._written[key] = path
        self.bytes_written += sum(t.untyped_storage().nbytes() for t in tensors.values())
        self.files_written += 1

    def _next_path(self, nbytes: int) -> str:
        if self._files.dir is None:
            root = weights_root(nbytes)
            _remove_stale_dirs(root)
            self._files.dir = tempfile.mkdtemp(prefix=f"{WEIGHTS_DIR_PREFIX}{os.getpid()}-", dir=root)
        self._count += 1
        return os.path.join(self._files.dir, f"weights-{self._count}.pt")


def _write_file(path: str, tensors: dict[str, Any]) -> None:
    """``torch.save`` without the zip CRC (a third of the time; the file never leaves this machine)."""
    import torch

    try:
        from torch.utils.serialization import config

        with config.save.patch(compute_crc32=False):  # type: ignore[attr-defined]
            torch.save(tensors, path)
    except (ImportError, AttributeError):  # torch < 2.6
        torch.save(tensors, path)


class _PlanPickling:
    """``persistent_id`` for one pickling of a plan (main process). See the NOTE."""

    def __init__(self, shipper: WeightShipper, inherit: bool) -> None:
        self.shipper = shipper
        self.inherit = inherit
        self._torch: Any = None
        self._keys: dict[int, str] = {}  # id(tensor) -> key, for the tensors of modules met
        self._kept: list[Any] = []  # the tensors indexed: no id reused during the pickling
        self._pending: dict[str, Any] = {}  # key -> tensor, for this pickling's file
        self._path: Optional[str] = None

    def persistent_id(self, obj: Any) -> Optional[WeightRef]:
        """A reference for a module's large CPU tensor (indexing a module when met); None otherwise."""
        torch = self._torch
        if torch is None:
            torch = self._torch = _imported_torch()
            if torch is None:
                return None
        if isinstance(obj, torch.nn.Module):
            self._index(obj)
            return None
        if type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter:
            return None
        key = self._keys.get(id(obj))
        if key is None or not _shippable(obj, torch):
            return None
        with self.shipper._lock:
            path = self._place(key, obj)
        return (_REF_TAG, key, path, isinstance(obj, torch.nn.Parameter), bool(obj.requires_grad))

    def finish(self) -> None:
        """Writes this pickling's file (after the plan pickled without error)."""
        with self.shipper._lock:
            if self._pending and self._path is not None:
                self.shipper._write(self._pending, self._path)
            self._pending = {}

    def _index(self, module: Any) -> None:
        from ..gpu.model_content import named_tensors

        tensors = [(kind, name, t) for kind, name, t in named_tensors(module) if id(t) not in self._keys]
        if not tensors:
            return
        if self.inherit:
            prefix = f"inherited-{os.getpid()}"
            for _, _, tensor in tensors:
                self._keys[id(tensor)] = f"{prefix}-{id(tensor)}"
        else:
            digest = _module_digest(module)
            for kind, name, tensor in tensors:
                self._keys[id(tensor)] = f"{digest}/{kind}/{name}"
        self._kept.extend(t for _, _, t in tensors)

    def _place(self, key: str, tensor: Any) -> Optional[str]:
        shipper = self.shipper
        if self.inherit:
            shipper._inherit(key, tensor.detach())
            return None
        written = shipper._written.get(key)
        if written is not None:
            return written
        if self._path is None:
            self._path = shipper._next_path(_plan_nbytes(self._kept))
        self._pending[key] = tensor.detach()
        return self._path


def _imported_torch() -> Any:
    import sys

    return sys.modules.get("torch")  # a plan holding a module has torch imported


def _shippable(tensor: Any, torch: Any) -> bool:
    return (
        tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.grad_fn is None
        and not tensor.is_quantized
        and tensor.untyped_storage().nbytes() >= SHIPPED_TENSOR_MIN_BYTES
    )


def _plan_nbytes(tensors: list[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


#: Main process: module -> (its tensors' identities and versions, its digest): a module not
#: changed since the last run is not hashed again (warm pools, repeated runs).
_digests: weakref.WeakKeyDictionary[Any, tuple[tuple[tuple[int, int], ...], str]] = weakref.WeakKeyDictionary()


def _module_digest(module: Any) -> str:
    from ..gpu.model_content import model_digest, named_tensors

    fingerprint = tuple((id(t), t._version) for _, _, t in named_tensors(module))
    cached = _digests.get(module)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    digest = model_digest(module)
    _digests[module] = (fingerprint, digest)
    return digest


# -- worker side -------------------------------------------------------------------------------


def resolve_weight(ref: Any, memo: dict[tuple[str, bool, bool], Any]) -> torch.Tensor:
    """The tensor a plan's reference stands for (worker, while its plan is unpickled).

    ``memo`` is the unpickling's own: a parameter met twice (tied weights) is one object.

    Raises:
        SerializationError: not a weight reference, or its file or entry is gone.
    """
    if not (isinstance(ref, tuple) and len(ref) == 5 and ref[0] == _REF_TAG):
        raise SerializationError(f"the plan holds an unknown persistent reference {ref!r}")
    _, key, path, is_parameter, requires_grad = ref
    found = memo.get((key, is_parameter, requires_grad))
    if found is not None:
        return found
    import torch

    tensor = _inherited_tensor(key) if path is None else _file_tensor(key, path)
    value = torch.nn.Parameter(tensor.detach(), requires_grad) if is_parameter else tensor.detach()
    memo[(key, is_parameter, requires_grad)] = value
    return value


def _inherited_tensor(key: str) -> Any:
    tensor = _INHERITED.get(key)
    if tensor is None:
        raise SerializationError(
            f"model weight {key} was to be inherited from the main process, but this process "
            "was not forked after the plan was pickled"
        )
    return tensor


def _file_tensor(key: str, path: str) -> Any:
    with _loaded_lock:
        loaded = _LOADED.get(key)
        if loaded is not None and loaded[0]._version == loaded[1]:
            return loaded[0]
        # Never loaded here, or changed in place by a run: the file's (private) pages again.
        tensors = _FILES.get(path) if loaded is None else None
        if tensors is None or key not in tensors:
            tensors = _load_file(path)
            _FILES[path] = tensors
        tensor = tensors.get(key)
        if tensor is None:
            raise SerializationError(f"the weight file {path} has no tensor {key}")
        _LOADED[key] = (tensor, tensor._version)
        return tensor


def _load_file(path: str) -> dict[str, Any]:
    import torch

    try:
        loaded: dict[str, Any] = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except FileNotFoundError as exc:
        raise SerializationError(
            f"the model weight file {path} is gone (removed when the run or warm pool that wrote it ended)"
        ) from exc
    return loaded


def forget_loaded_weights() -> None:
    """Drops what this process loaded (tests; a worker keeps it for later runs)."""
    with _loaded_lock:
        _LOADED.clear()
        _FILES.clear()


# -- warm pools ----------------------------------------------------------------------------------

_pool_shippers: weakref.WeakKeyDictionary[Any, WeightShipper] = weakref.WeakKeyDictionary()
_pool_lock = threading.Lock()


def pool_weight_shipper(pool: Any) -> WeightShipper:
    """The shipper of a warm pool (main process): made at its first run, closed with it.

    What it wrote stays until :func:`close_pool_weights` (``WorkerPool.close``), garbage
    collection of the pool, or interpreter exit: a later run, or a worker replaced after a
    crash, finds the file of a model shipped earlier.
    """
    with _pool_lock:
        shipper = _pool_shippers.get(pool)
        if shipper is None:
            shipper = _pool_shippers[pool] = WeightShipper()
            weakref.finalize(pool, shipper.close)
        return shipper


def close_pool_weights(pool: Any) -> None:
    """Removes the weight files of a warm pool (main process; idempotent)."""
    with _pool_lock:
        shipper = _pool_shippers.pop(pool, None)
    if shipper is not None:
        shipper.close()

