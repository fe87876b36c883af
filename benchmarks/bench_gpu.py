"""map_gpu with GPU workers against a single-process loop (GitHub issue 4, item 8).

The workload is a realistic text classifier:

* ``prepare_batch`` (CPU worker): pure-Python normalisation of each document (lowercase,
  unicode NFKD, combining marks and punctuation dropped, character by character), words
  hashed to ids (crc32), truncated to ``MAX_TOKENS`` and padded; returns
  ``{"input_ids", "attention_mask"}`` int64 tensors.
* ``forward`` (GPU worker): a small transformer encoder (``torch.nn.TransformerEncoder``, 2
  layers, d_model 128, 4 heads), mean pooling over the mask, a linear classifier.
* ``postprocess`` (CPU worker): argmax, one ``{"id", "label"}`` record per document.

CPU mode (the default; no GPU needed) first measures, in this process, the time of
``prepare_batch`` and of ``forward`` per batch (the *split*; ``--words-per-doc`` and
``--batch-size`` tune it: prepare cost grows with the document length, forward cost stops
growing at ``MAX_TOKENS``), then times, side by side in rounds (best of ``--repeats``):

  (a) the single-process loop, prepare -> forward -> postprocess, with torch's default
      intra-op threads and with 1 thread,
  (b) streamproc's simple backend (torch's default threads),
  (c) streamproc multiprocessing, 1 CPU worker + 1 GPU worker on device "cpu",
  (c') the same with one task for all documents (a diagnostic: a CPU worker waits for its
      in-flight batches at the end of each task, so the GPU worker idles for about one
      prepare_batch per task; the default task is 1,024 documents, 16 batches of 64),
  (d) streamproc multiprocessing, 2 CPU workers + 0 GPU workers (forward in the CPU workers),
  (e) edsnlp's ``map_gpu`` with 1 CPU worker + 1 GPU worker on "cpu", when edsnlp imports,
      with its default start method (spawn, as it has a torch pipe) and with fork.

Fairness: streamproc caps each worker process at 1 torch thread (environment.
cap_worker_threads), as edsnlp does (OMP_NUM_THREADS=1), so (c), (d) and (e) use 2
processes x 1 thread on a 2-core machine; the loop's fair counterpart is the one with torch's
default threads (one per core: the same 2 cores, used by intra-op parallelism). The 1-thread
loop is shown too: it is what the same per-batch work costs on one core, the reference of the
split. Speedups are given against both; the target (>= 1.3x for (c)) is judged against the
default-threads loop, the faster. Every side computes with the same model weights and the
same batches; labels are checked against the loop's (argmax may flip on a near tie between
thread counts, so >= 99.5% agreement is required, the ids exactly). Process start-up is
included in every time (fork here: about 0.1 s; edsnlp's spawn: seconds, torch imported in
each worker).

CUDA mode (``--device cuda``) uses a bigger model (6 layers, d_model 384, batches of 256,
documents of ~64 words) and compares (a) the single-process loop on the GPU, (b) forward
alone on batches prepared and moved to the device beforehand (the upper bound), (c) streamproc
with N CPU workers + 1 GPU worker, for each N of ``--cpu-workers``. It reports documents/s
(also from the first output on, without start-up: CUDA is initialised in the main process by
then, so even CPU workers are spawned) and the GPU busy fraction: for (a) the time inside
forward (synchronised) over the wall clock; for (c) the forward-alone time of (b) over the
wall clock (the same forwards run), and ``torch.cuda.utilization()`` sampled every 50 ms when
NVML (pynvml) is available. ``--smoke`` runs that code on the CPU with a tiny model, to check
the script on a machine without a GPU (it measures nothing).

Usage::

    python benchmarks/bench_gpu.py --split-only                 # tune the prepare/forward split
    python benchmarks/bench_gpu.py --wait-idle 20               # CPU mode, ~3 min on 2 cores
    python benchmarks/bench_gpu.py --docs 2000 --repeats 1      # quick
    python benchmarks/bench_gpu.py --device cuda --cpu-workers 1,2,4,8,12 --autocast
    python benchmarks/bench_gpu.py --smoke                      # the CUDA mode's code, on the CPU

Times are reported, never asserted. ``bg cpu`` is how many cores other processes used during
the best run (``/proc/stat`` minus this process tree): on a shared machine a row with ``bg
cpu`` well above 0 was slowed down by something else. Record figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import sys
import threading
import time
import unicodedata
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run from a checkout without installing streamproc
    sys.path.insert(0, REPO_ROOT)

from _machine import busy_cpu_s, cpu_model_name, own_cpu_s  # noqa: E402  (sibling module of this script)

import streamproc as sp  # noqa: E402

#: Hash buckets for words (id 0 is padding).
VOCAB_SIZE = 32_768
#: Documents are truncated to this many tokens (the model's positions).
MAX_TOKENS = 64
NUM_CLASSES = 8
#: Labels of the loop and of a side may differ on near ties (thread counts change the float
#: summation order); at least this fraction must agree.
MIN_LABEL_AGREEMENT = 0.995
EDSNLP_TIMEOUT_S = 300

#: Defaults of CPU mode, tuned with --split-only on the 2-core machine of docs/benchmarks.md
#: so that prepare_batch and forward (1 thread) take about the same time per batch.
CPU_WORDS_PER_DOC = 1000
CPU_BATCH_SIZE = 64
CPU_DOCS = 4_096
#: The CUDA mode's model and batches.
CUDA_MODEL = {"d_model": 384, "num_layers": 6, "nhead": 6}
CUDA_BATCH_SIZE = 256
CUDA_WORDS_PER_DOC = 64
CUDA_DOCS = 200_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the workload ------------------------------------------------------------------------------

_SYLLABLES = ["ka", "re", "mi", "to", "lu", "sé", "na", "Ré", "ço", "pä", "ïn", "Öl", "bu", "da", "gé", "ho", "fi", "Za"]


def make_documents(n: int, words_per_doc: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` documents of about ``words_per_doc`` words (±25%), with capitals, accents and punctuation."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(5_000)]
    punctuation = [",", ".", ";", ":", "!", "?", "«", "»", "—", "(", ")", "'", '"']
    docs = []
    for i in range(n):
        length = rng.randint(words_per_doc * 3 // 4, words_per_doc * 5 // 4)
        words = []
        for word in rng.choices(vocabulary, k=length):
            if rng.random() < 0.15:
                word = word + rng.choice(punctuation)
            if rng.random() < 0.05:
                word = word.upper()
            words.append(word)
        docs.append({"id": i, "text": " ".join(words)})
    return docs


def normalize(text: str) -> str:
    """Lowercase, NFKD, without combining marks and Unicode punctuation (a pure-Python character loop)."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch) and unicodedata.category(ch)[0] != "P")


def tokenize(text: str) -> list[int]:
    """Word ids in [1, VOCAB_SIZE): a stable hash (``hash()`` differs between processes)."""
    ids = [zlib.crc32(word.encode()) % (VOCAB_SIZE - 1) + 1 for word in normalize(text).split()]
    return ids[:MAX_TOKENS] or [1]


def prepare_batch(records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Runs in a CPU worker (or the main process): tokenize and pad to the batch's longest."""
    token_ids = [tokenize(r["text"]) for r in records]
    width = max(map(len, token_ids))
    input_ids = torch.zeros((len(records), width), dtype=torch.int64)
    attention_mask = torch.zeros((len(records), width), dtype=torch.int64)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class Classifier(torch.nn.Module):
    """Embeddings + positions, a TransformerEncoder, mean pooling over the mask, a linear head."""

    def __init__(self, d_model: int = 128, num_layers: int = 2, nhead: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB_SIZE, d_model, padding_idx=0)
        self.position = torch.nn.Embedding(MAX_TOKENS, d_model)
        layer = torch.nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=4 * d_model, batch_first=True)
        # No nested tensors: padded positions are computed, as most production encoders do.
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d_model, NUM_CLASSES)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = torch.arange(ids.shape[1], device=ids.device)
        hidden = self.encoder(self.embed(ids) + self.position(positions), src_key_padding_mask=mask == 0)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return self.head(pooled)


def postprocess(records: list[dict[str, Any]], logits: torch.Tensor) -> list[dict[str, Any]]:
    """Runs in a CPU worker (or the main process): one record per document."""
    return [{"id": r["id"], "label": label} for r, label in zip(records, logits.argmax(dim=-1).tolist())]


def prepare_batch_edsnlp(records: list[dict[str, Any]], device: Any) -> dict[str, torch.Tensor]:
    """edsnlp's prepare_batch also takes the device (it moves the batch itself)."""
    return prepare_batch(records)


def postprocess_edsnlp(records: list[dict[str, Any]], logits: torch.Tensor, inputs: Any = None) -> list[dict[str, Any]]:
    """edsnlp's multiprocessing backend also passes the prepared inputs."""
    return postprocess(records, logits)


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Raises TimeoutError in the main thread after ``seconds`` (SIGALRM; Unix only)."""

    def timeout(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- measuring -----------------------------------------------------------------------------------


def wait_for_idle(max_wait_s: float, max_busy_cores: float = 0.3, window_s: float = 0.5) -> float:
    """Waits (up to ``max_wait_s``) until other processes use under ``max_busy_cores`` cores.

    On a shared machine this keeps one measurement from landing on another job's burst.
    Returns the busy cores of the last window (logged when the wait timed out).
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0 = busy_cpu_s()
        time.sleep(window_s)
        busy = (busy_cpu_s() - busy0) / window_s
        if busy < max_busy_cores or time.monotonic() >= deadline:
            if busy >= max_busy_cores and max_wait_s > 0:
                log(f"  (machine still busy after {max_wait_s:.0f} s: {busy:.2f} cores; measuring anyway)")
            return busy


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Runs the block with ``n`` torch intra-op threads (None: leave as is)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Sample:
    seconds: float
    bg_cores: float  # other processes' CPU use during the run, in cores
    cpu_s: float  # CPU seconds of this process tree (workers included)
    gpu_busy: Optional[float] = None


@dataclass
class Side:
    name: str
    run: Callable[[], list[dict[str, Any]]]
    threads: Optional[int] = None  # torch threads in this (the main) process during the run
    samples: list[Sample] = field(default_factory=list)
    error: Optional[str] = None


class GPUUtilizationSampler:
    """Samples ``torch.cuda.utilization()`` (NVML) every 50 ms on a thread of this process."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.values: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-gpu-utilization", daemon=True)

    @staticmethod
    def available(device: str) -> bool:
        try:
            torch.cuda.utilization(device)
        except Exception:  # no NVML (pynvml missing) or no GPU
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.values.append(torch.cuda.utilization(self.device))

    def __enter__(self) -> GPUUtilizationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(1.0)

    @property
    def busy(self) -> Optional[float]:
        return statistics.mean(self.values) / 100 if self.values else None


def measure(side: Side, gpu_device: Optional[str] = None) -> tuple[Sample, list[dict[str, Any]]]:
    sampler = GPUUtilizationSampler(gpu_device) if gpu_device and GPUUtilizationSampler.available(gpu_device) else None
    busy0, own0 = busy_cpu_s(), own_cpu_s()
    with torch_threads(side.threads), sampler if sampler is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        result = side.run()
        seconds = time.perf_counter() - t0
    own = own_cpu_s() - own0
    bg = max(0.0, (busy_cpu_s() - busy0) - own) / seconds
    busy = sampler.busy if sampler is not None else None
    return Sample(seconds, bg, own, busy), result


def check_labels(result: list[dict[str, Any]], reference: list[dict[str, Any]]) -> Optional[str]:
    if [r["id"] for r in result] != [r["id"] for r in reference]:
        return "ids differ from the loop's (order or count)"
    agree = sum(a["label"] == b["label"] for a, b in zip(result, reference)) / max(1, len(reference))
    return None if agree >= MIN_LABEL_AGREEMENT else f"only {agree:.1%} of labels agree with the loop's"


def run_rounds(
    sides: list[Side], repeats: int, reference: list[dict[str, Any]], gpu_device: Optional[str] = None, wait_idle_s: float = 0.0
) -> None:
    """Times every side ``repeats`` times, in rounds (each round runs each side once), so that
    every side sees the same drift of the machine's load."""
    for round_index in range(repeats):
        for side in sides:
            if wait_idle_s:
                wait_for_idle(wait_idle_s)
            sample, result = measure(side, gpu_device)
            side.samples.append(sample)
            side.error = side.error or check_labels(result, reference)
            log(f"  round {round_index + 1}: {side.name}: {sample.seconds:.2f} s (bg cpu {sample.bg_cores:.2f})")


# --- the split -------------------------------------------------------------------------------------


@dataclass
class Split:
    """Median milliseconds per batch: wall clock, and CPU time of this process (``process_time``).

    CPU time is the steadier figure on a shared machine for single-threaded work (prepare,
    forward with 1 thread); with several torch threads only the wall clock says anything.
    """

    prepare_ms: float
    prepare_cpu_ms: float
    forward_ms: dict[int, float]  # by torch thread count
    forward_cpu_ms: dict[int, float]
    postprocess_ms: float
    tokens_per_batch: float


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, time.process_time() - cpu0, result


def measure_split(
    docs: list[dict[str, Any]], model: torch.nn.Module, batch_size: int, thread_counts: list[int], device: str = "cpu"
) -> Split:
    """Median time per batch of each part, in this process (no streamproc), over 30 batches."""
    batches = [docs[i : i + batch_size] for i in range(0, len(docs) - batch_size + 1, batch_size)][:30]
    prepare, prepare_cpu, prepared = [], [], []
    for records in batches:
        wall, cpu, batch = _timed(lambda records=records: prepare_batch(records))
        prepare.append(wall)
        prepare_cpu.append(cpu)
        prepared.append(batch)
    model = model.to(device).eval()
    on_device = [{k: v.to(device) for k, v in b.items()} for b in prepared]
    forward: dict[int, float] = {}
    forward_cpu: dict[int, float] = {}
    all_logits = []
    for threads in thread_counts:
        walls, cpus = [], []
        with torch_threads(threads), torch.inference_mode():
            model(on_device[0])  # warm-up
            for batch in on_device:
                _sync(device)
                wall, cpu, logits = _timed(lambda batch=batch: model(batch).cpu())
                walls.append(wall)
                cpus.append(cpu)
                all_logits.append(logits)
        forward[threads] = statistics.median(walls) * 1e3
        forward_cpu[threads] = statistics.median(cpus) * 1e3
    post = [_timed(lambda r=records, lg=logits: postprocess(r, lg))[0] for records, logits in zip(batches, all_logits)]
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in prepared)
    return Split(
        statistics.median(prepare) * 1e3,
        statistics.median(prepare_cpu) * 1e3,
        forward,
        forward_cpu,
        statistics.median(post) * 1e3,
        tokens,
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def print_split(split: Split, batch_size: int, words_per_doc: int) -> None:
    print(
        f"\nSplit per batch of {batch_size} documents (~{words_per_doc} words each, "
        f"{split.tokens_per_batch:.0f} tokens after truncation), median of 30 batches, wall (CPU) ms:"
    )
    print(f"  prepare_batch: {split.prepare_ms:.1f} ({split.prepare_cpu_ms:.1f})")
    for threads, ms in split.forward_ms.items():
        ratio = split.prepare_cpu_ms / split.forward_cpu_ms[threads] if threads == 1 else split.prepare_ms / ms
        print(
            f"  forward, {threads} torch thread{'s' if threads > 1 else ''}: {ms:.1f} ({split.forward_cpu_ms[threads]:.1f})"
            f"  -> prepare / forward = {ratio:.2f}{' (CPU times)' if threads == 1 else ' (wall)'}"
        )
    print(f"  postprocess: {split.postprocess_ms:.2f}")


# --- the sides -------------------------------------------------------------------------------------


def loop(docs: list[dict[str, Any]], model: torch.nn.Module, batch_size: int, device: str = "cpu") -> list[dict[str, Any]]:
    """The single-process baseline: what a user writes without streamproc."""
    model = model.to(device).eval()
    out: list[dict[str, Any]] = []
    with torch.inference_mode():
        for i in range(0, len(docs), batch_size):
            records = docs[i : i + batch_size]
            batch = {k: v.to(device, non_blocking=True) for k, v in prepare_batch(records).items()}
            out.extend(postprocess(records, model(batch).cpu()))
    return out


def streamproc_stream(docs: list[dict[str, Any]], model: torch.nn.Module, batch_size: int, **options: Any) -> sp.Stream:
    """The same pipeline with streamproc. The default task size (1,024 documents) is a
    multiple of the batch sizes used here, so every side sees the loop's batches."""
    stream = sp.from_iterable(docs).map_gpu(prepare_batch, model, postprocess, batch_size=batch_size)
    assert 1024 % batch_size == 0 or "task_size" in options, "batches would differ from the loop's"
    return stream.set_processing(**options)


def edsnlp_sides(
    docs: list[dict[str, Any]], model: torch.nn.Module, batch_size: int, cpu: int, gpu: int, devices: list[str]
) -> list[Side]:
    """edsnlp's map_gpu with its default start method (spawn, with a torch pipe), and with fork.

    edsnlp caps its workers' threads itself (OMP_NUM_THREADS=1 before spawning), like
    streamproc; with fork, the workers inherit this process's torch thread count, so that side
    runs with 1 torch thread here.
    """
    try:
        import edsnlp
    except ImportError:
        log("edsnlp is not importable here: its sides are skipped")
        return []

    def run(start_method: Optional[str]) -> list[dict[str, Any]]:
        stream = edsnlp.data.from_iterable(docs).map_gpu(prepare_batch_edsnlp, model, postprocess_edsnlp, batch_size=batch_size)
        stream = stream.set_processing(
            backend="multiprocessing",
            num_cpu_workers=cpu,
            num_gpu_workers=gpu,
            gpu_worker_devices=devices,
            preserve_output_order=True,
            process_start_method=start_method,
        )
        # edsnlp 0.23 can hang when a worker fails (it logs the error and waits): bound the run.
        with alarm(EDSNLP_TIMEOUT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "fork with GPU workers may deadlock"; dill on __main__ classes
            return list(stream)

    name = f"edsnlp {edsnlp.__version__} map_gpu, {cpu} CPU + {gpu} GPU worker on {devices[0]}"
    return [
        Side(f"(e) {name}, spawn (its default)", lambda: run(None)),
        Side(f"(e') {name}, fork", lambda: run("fork"), threads=1),
    ]


def cpu_mode(args: argparse.Namespace) -> dict[str, Any]:
    docs = make_documents(args.docs, args.words_per_doc)
    model = Classifier().eval()
    default_threads = torch.get_num_threads()
    if args.wait_idle:
        wait_for_idle(args.wait_idle)
    split = measure_split(docs, model, args.batch_size, sorted({1, default_threads}))
    print_split(split, args.batch_size, args.words_per_doc)
    if args.split_only:
        return {"split": asdict(split)}

    reference = loop(docs, model, args.batch_size)
    b = args.batch_size
    sides = [
        Side(f"(a) single-process loop, {default_threads} torch threads (default)", lambda: loop(docs, model, b), threads=None),
        Side("(a') single-process loop, 1 torch thread", lambda: loop(docs, model, b), threads=1),
        Side("(b) streamproc simple backend", lambda: streamproc_stream(docs, model, b, backend="simple").to_list()),
        Side(
            '(c) streamproc multiprocessing, 1 CPU + 1 GPU worker on "cpu"',
            lambda: streamproc_stream(
                docs, model, b, backend="multiprocessing", num_cpu_workers=1, num_gpu_workers=1, gpu_worker_devices=["cpu"]
            ).to_list(),
        ),
        Side(
            "(c') the same, one task for all documents (diagnostic: no drain at task ends)",
            lambda: streamproc_stream(
                docs,
                model,
                b,
                backend="multiprocessing",
                num_cpu_workers=1,
                num_gpu_workers=1,
                gpu_worker_devices=["cpu"],
                task_size=len(docs),
            ).to_list(),
        ),
        Side(
            "(d) streamproc multiprocessing, 2 CPU + 0 GPU workers",
            lambda: streamproc_stream(docs, model, b, backend="multiprocessing", num_cpu_workers=2, num_gpu_workers=0).to_list(),
        ),
    ]
    if not args.no_edsnlp:
        sides.extend(edsnlp_sides(docs, model, b, 1, 1, ["cpu"]))
    log(f"{len(docs)} documents, batches of {b}, {args.repeats} rounds")
    run_rounds(sides, args.repeats, reference, wait_idle_s=args.wait_idle)
    baseline = min(s.seconds for s in sides[0].samples)
    baseline_1 = min(s.seconds for s in sides[1].samples)
    print_table(sides, len(docs), {"loop (default threads)": baseline, "loop (1 thread)": baseline_1})
    target = sides[3]
    speedup = baseline / min(s.seconds for s in target.samples)
    print(f"\n(c) against (a): {speedup:.2f}x (target >= 1.3x: {'met' if speedup >= 1.3 else 'MISSED'})")
    return {"split": asdict(split), "sides": [side_json(s) for s in sides], "speedup_c_over_a": speedup}


# --- CUDA mode ------------------------------------------------------------------------------------


def _autocast(device: str, enabled: bool) -> Any:
    return torch.autocast("cuda", dtype=torch.float16) if enabled and device.startswith("cuda") else contextlib.nullcontext()


def forward_only(batches: list[dict[str, torch.Tensor]], model: torch.nn.Module, device: str, autocast: bool) -> float:
    """Seconds of forward alone over batches already on the device: the upper bound."""
    with torch.inference_mode(), _autocast(device, autocast):
        _sync(device)
        t0 = time.perf_counter()
        for batch in batches:
            model(batch).argmax(dim=-1)
        _sync(device)
        return time.perf_counter() - t0


def loop_with_busy(
    docs: list[dict[str, Any]], model: torch.nn.Module, batch_size: int, device: str, autocast: bool
) -> tuple[list[dict[str, Any]], float]:
    """The single-process loop on the device; also returns the seconds spent in forward
    (synchronised before and after, so it is the device's busy time plus launch overhead)."""
    model = model.to(device).eval()
    pin = device.startswith("cuda")
    out: list[dict[str, Any]] = []
    busy = 0.0
    with torch.inference_mode(), _autocast(device, autocast):
        for i in range(0, len(docs), batch_size):
            records = docs[i : i + batch_size]
            batch = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in prepare_batch(records).items()}
            _sync(device)
            t0 = time.perf_counter()
            logits = model(batch)
            _sync(device)
            busy += time.perf_counter() - t0
            out.extend(postprocess(records, logits.float().cpu()))
    return out, busy


def timed_stream(stream: sp.Stream, n_docs: int) -> tuple[list[dict[str, Any]], float, float]:
    """Runs ``stream``; returns its outputs, the total seconds and the steady-state docs/s
    (from the first output on: process start-up, spawn's torch import included, excluded)."""
    t0 = time.perf_counter()
    out: list[dict[str, Any]] = []
    first_at = None
    for record in stream:
        if first_at is None:
            first_at = time.perf_counter()
        out.append(record)
    total = time.perf_counter() - t0
    first_at = first_at if first_at is not None else t0
    # Deterministic outputs come a task at a time: the first output ends the first task.
    steady = (n_docs - 1024) / max(1e-9, time.perf_counter() - first_at) if n_docs > 2048 else n_docs / total
    return out, total, steady


def many_documents(n: int, words_per_doc: int) -> list[dict[str, Any]]:
    """``n`` documents: up to 20,000 distinct texts, repeated with new ids (generating is slow)."""
    distinct = make_documents(min(n, 20_000), words_per_doc)
    return [{"id": i, "text": distinct[i % len(distinct)]["text"]} for i in range(n)]


def cuda_mode(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device_name
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device (torch.cuda.is_available() is False)")
    docs = many_documents(args.docs, args.words_per_doc)
    model = Classifier(**args.model).eval()
    b = args.batch_size
    split = measure_split(docs, model, b, [torch.get_num_threads()], device=device)
    print_split(split, b, args.words_per_doc)
    model = model.cpu()
    rows: list[dict[str, Any]] = []

    # (b) first: forward alone on pre-collated batches already on the device.
    on_device = [{k: v.to(device) for k, v in prepare_batch(docs[i : i + b]).items()} for i in range(0, len(docs), b)]
    device_model = model.to(device)
    forward_only(on_device[:3], device_model, device, args.autocast)  # warm-up (cuDNN/cuBLAS autotuning)
    forward_s = min(forward_only(on_device, device_model, device, args.autocast) for _ in range(args.repeats))
    del on_device, device_model
    model = model.cpu()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    # (a) the loop, best of the repeats (the first run also warms up and gives the reference labels).
    reference, _ = loop_with_busy(docs, model, b, device, args.autocast)
    best = min(
        (_timed(lambda: loop_with_busy(docs, model, b, device, args.autocast)) for _ in range(args.repeats)), key=lambda t: t[0]
    )
    loop_s, (_, loop_busy) = best[0], best[2]
    rows.append({"system": "(a) single-process loop", "seconds": loop_s, "steady_docs_per_s": None, "busy": loop_busy / loop_s})
    rows.append({"system": "(b) forward alone, batches already on the device (upper bound)", "seconds": forward_s, "busy": 1.0})
    model = model.cpu()

    # (c) streamproc, N CPU workers + 1 GPU worker. CUDA is initialised in this process by
    # now, so the CPU workers are spawned too (streamproc never forks after CUDA started here).
    for cpu in args.cpu_workers:
        options = {
            "num_cpu_workers": cpu,
            "num_gpu_workers": 1,
            "gpu_worker_devices": [device],
            "autocast": args.autocast or None,
        }
        stream = streamproc_stream(docs, model, b, backend="multiprocessing", **options)
        best_row = None
        for _ in range(args.repeats):
            sampler = GPUUtilizationSampler(device) if GPUUtilizationSampler.available(device) else None
            with sampler if sampler is not None else contextlib.nullcontext():
                out, seconds, steady = timed_stream(stream, len(docs))
            error = check_labels(out, reference)
            row = {
                "system": f"(c) streamproc, {cpu} CPU worker{'s' if cpu > 1 else ''} + 1 GPU worker"
                + (f" [{error}]" if error else ""),
                "seconds": seconds,
                "steady_docs_per_s": steady,
                # The GPU does the same forwards as in (b): busy ~ forward-alone time / wall.
                "busy": forward_s / seconds,
                "nvml_busy": sampler.busy if sampler is not None else None,
            }
            log(f"  {row['system']}: {seconds:.2f} s, steady {steady:,.0f} docs/s")
            if best_row is None or seconds < best_row["seconds"]:
                best_row = row
        rows.append(best_row)

    print(
        f"\n{len(docs)} documents (~{args.words_per_doc} words), batches of {b}, model {args.model}, "
        f"device {device}, autocast={args.autocast}, best of {args.repeats}"
    )
    print("| system | best (s) | docs/s | steady docs/s | GPU busy (forward time / wall) | GPU busy (NVML) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        steady = f"{row['steady_docs_per_s']:,.0f}" if row.get("steady_docs_per_s") else ""
        nvml = f"{row['nvml_busy']:.0%}" if row.get("nvml_busy") is not None else "n/a"
        docs_per_s = len(docs) / row["seconds"]
        print(f"| {row['system']} | {row['seconds']:.2f} | {docs_per_s:,.0f} | {steady} | {row['busy']:.0%} | {nvml} |")
    print(
        "\nGPU busy: (a) time inside forward, synchronised, over the wall clock; (c) the forward-alone "
        "time of (b) over the wall clock (the same forwards run); NVML: torch.cuda.utilization() "
        "sampled every 50 ms (needs pynvml). steady docs/s: from the first output on (start-up excluded)."
    )
    return {"split": asdict(split), "rows": rows}


# --- output ----------------------------------------------------------------------------------------


def side_json(side: Side) -> dict[str, Any]:
    return {"name": side.name, "samples": [asdict(s) for s in side.samples], "error": side.error}


def print_table(sides: list[Side], n_docs: int, baselines: dict[str, float]) -> None:
    names = list(baselines)
    print(f"\n| system | best (s) | median (s) | docs/s | cpu s | bg cpu | speedup vs {names[0]} | vs {names[1]} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for side in sides:
        best = min(side.samples, key=lambda s: s.seconds)
        median = statistics.median(s.seconds for s in side.samples)
        speedups = " | ".join(f"{baselines[name] / best.seconds:.2f}x" for name in names)
        error = f" **{side.error}**" if side.error else ""
        print(
            f"| {side.name}{error} | {best.seconds:.2f} | {median:.2f} | {n_docs / best.seconds:,.0f} | "
            f"{best.cpu_s:.1f} | {best.bg_cores:.2f} | {speedups} |"
        )


def machine() -> str:
    return f"{cpu_model_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--docs", type=int, help=f"documents (default: {CPU_DOCS} on cpu, {CUDA_DOCS} on cuda)")
    parser.add_argument(
        "--words-per-doc",
        type=int,
        help=f"mean words per document (default: {CPU_WORDS_PER_DOC} on cpu, {CUDA_WORDS_PER_DOC} on cuda)",
    )
    parser.add_argument(
        "--batch-size", type=int, help=f"documents per batch (default: {CPU_BATCH_SIZE} on cpu, {CUDA_BATCH_SIZE} on cuda)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best is reported (default 3)")
    parser.add_argument("--split-only", action="store_true", help="only measure the prepare/forward split")
    parser.add_argument("--no-edsnlp", action="store_true", help="skip edsnlp even if it imports")
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, metavar="S", help="wait up to S s for an idle machine before each run"
    )
    parser.add_argument("--cpu-workers", default="1,2,4,8", help="cuda mode: CPU worker counts to try (default 1,2,4,8)")
    parser.add_argument("--autocast", action="store_true", help="cuda mode: float16 autocast")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run the --device cuda code on the CPU, tiny model, few documents (checks the script; measures nothing)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.device_name = "cpu" if args.smoke else "cuda:0"
    args.model = {"d_model": 32, "num_layers": 1, "nhead": 2} if args.smoke else CUDA_MODEL
    if args.smoke:
        cuda, args.device = True, "cuda"
        args.docs = args.docs or 3_000
        args.batch_size = args.batch_size or 128
        args.repeats = min(args.repeats, 1)
    args.docs = args.docs or (CUDA_DOCS if cuda else CPU_DOCS)
    args.words_per_doc = args.words_per_doc or (CUDA_WORDS_PER_DOC if cuda else CPU_WORDS_PER_DOC)
    args.batch_size = args.batch_size or (CUDA_BATCH_SIZE if cuda else CPU_BATCH_SIZE)
    args.cpu_workers = [int(n) for n in args.cpu_workers.split(",")]
    if args.smoke:
        args.cpu_workers = args.cpu_workers[:2]
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    print(f"Machine: {machine()}")
    print(f"Command: python {' '.join(sys.argv)}")
    results = cuda_mode(args) if args.device == "cuda" else cpu_mode(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "argv": sys.argv, **results}, f, indent=2)


if __name__ == "__main__":
    main()
