"""dashskip's compiled CPU kernels, and the measured choice between them and torch's ops.

The extension (`csrc/`) holds products for few rows on weights packed once (decode, lossless verification, small
batches: BLAS's fp32 GEMM repacks the weight on every call for more than one row), the flat layers' small ops
and the DASH policy's folded decision. Whether a packed kernel beats torch's op depends on the host: on one Xeon
the fp32 kernel ran at 2x torch's speed, on another at 0.4x. So no speed choice is hard-coded: for each
(scheme, weight shape, row count) the handler's candidate kernels are timed here at first use, the fastest is
kept, and the choices are stored beside the cost tables under a fingerprint of the host (CPU model and flags,
threads, torch version). `dashskip profile` prints them.

`DASHSKIP_SMALL_GEMM` overrides the choice: `0` runs torch's ops only (and does not build the extension), `1`
runs dashskip's kernels wherever they apply without measuring (the integer VNNI ones first). `DASHSKIP_ISA=avx2`
hides the AVX-512 and VNNI kernels: what an AVX2-only CPU runs, on any host (the tests run both switches). The
extension is compiled on first use with torch's C++ extension builder (a C++ compiler and ninja) into the dashskip
cache, announced with one line; where it cannot run (no AVX/FMA, not x86-64 Linux, no compiler, a GPU tensor, autograd)
torch's ops run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from dashskip.core.files import atomic_write_text, cache_dir
from dashskip.errors import DashskipError

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("small_gemm.cpp", "layer_ops.cpp", "int_dot.cpp", "fused_layer.cpp")]
HEADERS = [CSRC / "ops.h"]
SMALL_ROWS = 16  # the packed kernels' range; past it BLAS's blocked GEMM reuses rows across cache levels
# The integer dot-product kernels' range: they keep a 16-column panel in cache over passes of up to 8 rows, so they may
# beat torch's dequantizing INT8/INT4 kernels well past 16 rows (batched decode, lossless verification, short
# prefill chunks); where they do is measured like every other choice.
INT_DOT_ROWS = 256
# A decode step's rows (one new token each: a server's batch) may take the compiled layer ops up to this many: their
# attention reads each row's cache once per query, and rows of one state run the layer as one compiled call.
DECODE_ROWS = 256
CHOICE_VERSION = 2  # 2: the integer kernels take up to 256 rows in passes of 8
COMPILED = ("vnni", "packed")  # dashskip's kernels, in the order DASHSKIP_SMALL_GEMM=1 prefers them


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.split(":", 1)[1].split())


@functools.cache
def _cpu_model() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _cpu_supports() -> str | None:
    """None if this CPU can run the kernels, else why not."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"it is built for x86-64 Linux, this is {platform.system()} {platform.machine()}"
    flags = _cpu_flags()
    if not flags:
        return "the CPU's features could not be read from /proc/cpuinfo"
    missing = {"avx", "fma", "f16c"} - flags  # f16c: a float16 K/V cache widened (every AVX2 CPU has it)
    return f"the CPU lacks {', '.join(sorted(missing))}" if missing else None


def mode() -> str:
    """'off' (torch's ops only), 'on' (dashskip's kernels where they apply) or 'measured' (the default)."""
    value = os.environ.get("DASHSKIP_SMALL_GEMM", "")
    return {"0": "off", "1": "on"}.get(value, "measured")


EXTENSION = "dashskip_small_gemm"


def _import_built(path: Path) -> ModuleType | None:
    """The extension built earlier at `path`, or None where there is none (or it does not import here)."""
    if not path.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location(EXTENSION, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


# -fopenmp: the kernels split their work with at::parallel_for, which runs serially unless the file is compiled with
# OpenMP (ATen's header checks _OPENMP); linked by soname, the extension shares torch's own libgomp and thread pool.
CFLAGS = ["-O3", "-mavx", "-mfma", "-mf16c", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


@functools.cache
def build_digest() -> str:
    """What the compiled kernels are: their sources, flags, torch version and Python ABI. A build is kept per digest,
    and kernel choices and cost tables measured with one build are not reused with another (`host_fingerprint`)."""
    stamp = f"{torch.__version__}:{sys.implementation.cache_tag}:{' '.join(CFLAGS + LDFLAGS)}".encode()
    return hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + stamp).hexdigest()[:12]


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernels, or None (with one warning saying why) where they cannot be used."""
    if mode() == "off":
        return None
    reason = _cpu_supports()
    if reason is None:
        from torch.utils.cpp_extension import load

        # One build per digest: another environment with the same torch imports it as it is (torch's builder would
        # rebuild for that environment's header paths, about 40 s).
        build = cache_dir() / "kernels" / f"small_gemm-{build_digest()}"
        built = _import_built(build / f"{EXTENSION}.so")
        if built is not None:
            return built
        build.mkdir(parents=True, exist_ok=True)
        print("dashskip: building its CPU kernels, once for this machine (about 40 seconds)...", file=sys.stderr)
        try:
            return load(EXTENSION, [str(p) for p in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                        build_directory=str(build), verbose=False)  # fmt: skip
        except (OSError, RuntimeError, ImportError) as err:  # no compiler or ninja, a failed build
            errors = [line for line in str(err).splitlines() if "error" in line.lower()] or [type(err).__name__]
            reason = f"it did not build ({errors[-1].strip()[:300]})"
    warnings.warn(
        f"dashskip's compiled CPU kernels are off because {reason}; decoding uses torch's ops (slower for "
        "1-16 rows, same results up to rounding). Set DASHSKIP_SMALL_GEMM=0 to silence this.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def avx512() -> bool:
    """Whether the AVX-512 kernels (the packed INT8 and the VNNI integer ones) may run: the extension is built, the
    CPU has AVX-512, and `DASHSKIP_ISA=avx2` does not hide them. That switch runs, on any host, what an AVX2-only
    CPU runs (the extension's AVX2 kernels and torch's ops), so the paths most users' CPUs take are tested here."""
    ext = extension()
    return ext is not None and os.environ.get("DASHSKIP_ISA", "") != "avx2" and bool(ext.has_int8())


def vnni() -> bool:
    """Whether the integer dot-product (AVX512-VNNI) kernels may run (`avx512`, and the CPU has VNNI)."""
    return avx512() and bool(extension().has_vnni())


def onednn() -> bool:
    """Whether torch has oneDNN (x86, and ARM builds with it): its matmul on a weight reordered once into its
    blocked layout (`torch.ops.mkldnn`, what torch's inductor uses for frozen CPU linears). BLAS's GEMM packs the
    weight on every call; on 2-32 rows the prepacked product measured up to 2.5x faster (SmolLM2's LM head at 8
    rows: 6.4 ms against 13.0 packed, 17.3 torch). A candidate like any other, chosen where it measures fastest (never
    under DASHSKIP_SMALL_GEMM=0 or 1, which mean torch's op only and dashskip's kernels by rule)."""
    return torch.backends.mkldnn.is_available()


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def compiled_rows(x: torch.Tensor, most: int = SMALL_ROWS) -> bool:
    """Whether `x` may go to a compiled kernel at all: few fp32 CPU rows (at most `most`), no autograd, the extension
    built."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        0 < rows <= most
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not needs_grad(x)
        and extension() is not None
    )


def layer_rows(x: torch.Tensor) -> bool:
    """Whether a layer's small ops (norms, rope, attention) may be compiled calls for `x` (batch, tokens, hidden):
    few rows, or a decode step's rows up to `DECODE_ROWS`."""
    return compiled_rows(x, DECODE_ROWS if x.dim() == 3 and x.shape[1] == 1 else SMALL_ROWS)


def row_bucket(rows: int) -> int:
    """Row counts that share a kernel choice: 1, 2, 4, 8, 16 exactly up to the packed range, then powers of 4."""
    if rows <= SMALL_ROWS:
        return 1 << max(rows - 1, 0).bit_length()
    bucket = 64
    while bucket < rows and bucket < 4096:
        bucket *= 4
    return bucket


def host_fingerprint() -> str:
    """What a measured kernel choice (and cost table) holds for: CPU model and flags, threads, torch version, and
    the compiled kernels' build."""
    text = "|".join([_cpu_model(), " ".join(sorted(_cpu_flags())), f"threads{torch.get_num_threads()}",
                     torch.__version__, build_digest()])  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def host_description() -> str:
    return f"{_cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


ACTIVATIONS = ("int8", "bf16")


def activations() -> str:
    """How the INT8 and INT4 states treat activations: 'int8' (rows quantized, integer products) or 'bf16'.
    An environment variable, not an argument: it is the arithmetic of two states everywhere in a process (policy,
    cost table, lossless drafts), like the kernel override DASHSKIP_SMALL_GEMM."""
    return _activation_mode(os.environ.get("DASHSKIP_ACTIVATIONS", "int8"))


@functools.cache
def _activation_mode(value: str) -> str:
    """Checked once per value: `activations()` is asked up to three times per linear per token."""
    if value not in ACTIVATIONS:
        raise DashskipError(f"DASHSKIP_ACTIVATIONS={value!r} is not one of {', '.join(ACTIVATIONS)}; unset it or "
                            "pick one")  # fmt: skip
    return value


Timer = Callable[[str], float]  # kernel name -> seconds of one call on representative data


class KernelChoice:
    """The fastest kernel per (scheme, weight shape, row bucket) on this host: measured once, kept on disk."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded_for: str | None = None
        self.choices: dict[str, dict] = {}
        self.memo: dict[tuple, str] = {}  # the hot path: no lock, no hashing of the host
        self.generation = 0  # bumped by `forget`: whatever was built from earlier choices is stale

    @staticmethod
    def path(host: str) -> Path:
        return cache_dir() / "kernels" / f"choices-{host}.json"

    def _load(self, host: str) -> None:
        if self.loaded_for == host:
            return
        self.loaded_for, self.choices = host, {}
        try:
            data = json.loads(self.path(host).read_text())
            if data.get("version") == CHOICE_VERSION:
                self.choices = dict(data.get("choices", {}))
        except (OSError, ValueError):
            pass

    def pick(self, scheme: str, shape: tuple[int, int], rows: int, kernels: list[str], timer: Timer) -> str:
        """The kernel to run; `timer` measures a candidate when this (scheme, shape, rows) is new here."""
        if len(kernels) == 1:
            return kernels[0]
        fast = (scheme, shape, row_bucket(rows), tuple(kernels), torch.get_num_threads(), activations())
        hit = self.memo.get(fast)
        if hit is None:
            hit = self.memo[fast] = self._pick(scheme, shape, rows, kernels, timer)
        return hit

    def _pick(self, scheme: str, shape: tuple[int, int], rows: int, kernels: list[str], timer: Timer) -> str:
        if mode() == "on":  # dashskip's compiled kernel where there is one (integer first), else the handler's first
            return next((k for k in COMPILED if k in kernels), kernels[0])
        key = f"{scheme}|{shape[0]}x{shape[1]}|rows{row_bucket(rows)}|{'/'.join(sorted(kernels))}|{activations()}"
        host = host_fingerprint()
        with self.lock:
            self._load(host)
            known = self.choices.get(key)
            if known is not None and known["kernel"] in kernels:
                return known["kernel"]
            times = measure(kernels, timer)
            best = min(times, key=times.get)
            self.choices[key] = {"kernel": best, "ms": {k: round(v * 1e3, 4) for k, v in times.items()}}
            self._save(host)
            return best

    def _save(self, host: str) -> None:
        data = {"version": CHOICE_VERSION, "host": host_description(), "choices": self.choices}
        with contextlib.suppress(OSError):  # a read-only cache still runs, measuring again next time
            atomic_write_text(self.path(host), json.dumps(data, indent=1, sort_keys=True))

    def forget(self) -> None:
        """Drop the choices in memory (tests; a changed DASHSKIP_SMALL_GEMM)."""
        with self.lock:
            self.memo.clear()
            self.loaded_for, self.choices = None, {}
            self.generation += 1

    def table(self) -> list[tuple[str, str, dict]]:
        """(key, chosen kernel, ms per candidate) of every choice made on this host."""
        with self.lock:
            self._load(host_fingerprint())
            return [(k, v["kernel"], v["ms"]) for k, v in sorted(self.choices.items())]


CHOICE = KernelChoice()
FLUSH_BYTES = 64 << 20  # more than the last-level caches seen: a decode step streams every weight from memory


@functools.cache
def _flush_buffer() -> torch.Tensor:
    with torch.inference_mode(False):  # a plain tensor, whatever mode the first measurement ran in
        return torch.ones(FLUSH_BYTES // 4)


def measure(kernels: list[str], timer: Timer, rounds: int = 5) -> dict[str, float]:
    """Median seconds per kernel, interleaved over rounds, each call with cold caches as in a decode step. A kernel
    that fails on this shape (torch's INT8 kernel wants widths it supports) is never chosen."""
    flush = _flush_buffer()
    samples: dict[str, list[float]] = {}
    for k in kernels:
        try:
            timer(k)  # first call: packing, allocation
            samples[k] = []
        except RuntimeError:
            continue
    for _ in range(rounds):
        for k in samples:
            flush.sum()  # reads more than the caches hold: the candidate starts cold
            samples[k].append(timer(k))
    return {k: statistics.median(v) for k, v in samples.items()}


def time_call(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
