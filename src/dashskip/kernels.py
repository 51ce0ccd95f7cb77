"""dashskip's compiled CPU kernels for few rows: decode steps, the verifier's k+1 tokens in lossless mode, small
batches.

- fp32 linears (`FewRowLinear`, `csrc/small_gemm.cpp`): BLAS's fp32 GEMM repacks the weight on every call for
  more than one row, and its one-row path reads the weight well under the memory bandwidth. Each weight is packed
  once into 16-column panels and streamed once per call with up to 6 rows accumulating in registers: SmolLM2's
  linears run about 2x faster for 1 row and ~2.3x for 5 (`python benchmarks/small_gemm.py`; docs/speed.md).
- INT8 weight-only linears (`FewRowInt8Linear`, AVX-512 only, chosen at run time): codes widened in registers,
  torch's arithmetic (bf16 activations and outputs), ~1.8x faster than torch's compute-bound kernel.
- the flat Llama-family layer's small ops and the DASH policy's decision (`csrc/layer_ops.cpp`, used by
  `flat.FlatLayer` and `policy.GreedyScorer`): one call each instead of 5-15 torch ops.

It is compiled on first use with torch's C++ extension builder (a C++ compiler and ninja, both on a standard Linux
machine) into the dashskip cache. Where it cannot run (no AVX/FMA, not x86-64 Linux, no compiler, a GPU tensor,
autograd, `DASHSKIP_SMALL_GEMM=0`) torch's own ops run instead; results differ only by float rounding order.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch.nn import functional as F

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("small_gemm.cpp", "layer_ops.cpp")]
# Up to this many rows the packed kernel beats BLAS (measured on SmolLM2's shapes, 2 threads); from there BLAS's
# blocked GEMM, which also reuses the rows across cache levels, is faster.
SMALL_ROWS = 16


def _cpu_supports() -> str | None:
    """None if this CPU can run the kernel, else why not."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"it is built for x86-64 Linux, this is {platform.system()} {platform.machine()}"
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "the CPU's features could not be read from /proc/cpuinfo"
    missing = {"avx", "fma"} - set(flags.split(":", 1)[1].split())
    return f"the CPU lacks {', '.join(sorted(missing))}" if missing else None


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernel, or None (with one warning saying why) where it cannot be used."""
    if os.environ.get("DASHSKIP_SMALL_GEMM", "1") == "0":
        return None
    reason = _cpu_supports()
    if reason is None:
        from torch.utils.cpp_extension import load

        from dashskip.loading import cache_dir

        digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + torch.__version__.encode()).hexdigest()
        build = cache_dir() / "kernels" / f"small_gemm-{digest[:12]}"
        build.mkdir(parents=True, exist_ok=True)
        try:
            return load("dashskip_small_gemm", [str(p) for p in SOURCES], extra_cflags=["-O3", "-mavx", "-mfma"],
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


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` should run in the packed kernel: few fp32 CPU rows, no autograd, kernel built."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        0 < rows <= SMALL_ROWS
        and x.dtype == torch.float32
        and weight.dtype in (torch.float32, torch.int8)
        and x.device.type == weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and extension() is not None
        and (weight.dtype == torch.float32 or extension().has_int8())
    )


def _source(weight: torch.Tensor) -> tuple[int, int]:
    """What a packed copy was made from: storage and in-place version (`.to()`, `load_state_dict`, `mul_`, ...);
    tensors made under inference mode have no version counter and cannot change in place."""
    return weight.data_ptr(), 0 if weight.is_inference() else weight._version


class FewRowLinear:
    """`F.linear` through the packed kernel when it pays. Several weights that read the same input (q/k/v,
    gate/up) give their outputs side by side from one product: one pass over the rows and one call instead of
    three. The weights are packed on first use (a copy of them in memory: none where the kernel never runs,
    as in training) and repacked when any of them changes."""

    def __init__(self, *weights: torch.Tensor) -> None:
        self.weights = weights
        self.out_features = sum(w.shape[0] for w in weights)
        self.panels: torch.Tensor | None = None
        self.packed_from: tuple[tuple[int, int], ...] | None = None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not usable(x, self.weights[0]):
            if len(self.weights) == 1:
                return F.linear(x, self.weights[0], bias)
            out = torch.cat([F.linear(x, w) for w in self.weights], dim=-1)
            return out if bias is None else out + bias
        ext = extension()
        source = tuple(_source(w) for w in self.weights)
        if self.packed_from != source:
            weight = torch.cat([w.detach() for w in self.weights]) if len(self.weights) > 1 else self.weights[0]
            self.panels, self.packed_from = ext.pack(weight.detach()), source
        out = ext.linear(x.reshape(-1, x.shape[-1]), self.panels, self.out_features)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if bias is None else out + bias


class FewRowInt8Linear:
    """Weight-only INT8 `(x @ q^T) * scale` for few fp32 rows: the codes are packed on first use into 16-column
    panels and widened to fp32 in registers, 16 at a time (AVX-512). torch's INT8 kernel is compute-bound on
    CPUs (SmolLM2's 210 linears for one row: 11.7 ms; here 5.1-6.6 ms). Same arithmetic as torch's: bf16
    activations, fp32 sums, bf16 outputs, so a row's result does not depend on which kernel ran it."""

    def __init__(self) -> None:
        self.panels: tuple[torch.Tensor, torch.Tensor] | None = None
        self.packed_from: tuple[int, int] | None = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ext = extension()
        source = _source(weight)
        if self.packed_from != source:
            self.panels, self.packed_from = tuple(ext.pack_int8(weight, scales)), source
        out = ext.linear_int8(x.reshape(-1, x.shape[-1]), *self.panels, weight.shape[0])
        return out.view(*x.shape[:-1], weight.shape[0])
