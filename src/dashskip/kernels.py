"""The fp32 linear for few rows: decode steps, the verifier's k+1 tokens in lossless mode, small batches.

BLAS's fp32 GEMM repacks the weight on every call for more than one row, and its one-row path reads the weight
at well under the memory bandwidth. `csrc/small_gemm.cpp` packs each weight once into 16-column panels and streams
them once per call with up to 6 rows accumulating in registers: on this project's reference CPU (2 AVX+FMA cores)
SmolLM2's linears run about 2x faster for 1 and for 5 rows, a whole decode or verification step about 1.7x
(`python benchmarks/small_gemm.py`; docs/speed.md).

It is compiled on first use with torch's C++ extension builder (a C++ compiler and ninja, both on a standard Linux
machine) into the dashskip cache. Where it cannot run (no AVX/FMA, not x86-64 Linux, no compiler, a GPU tensor,
autograd, `DASHSKIP_SMALL_GEMM=0`) every call is plain `F.linear`; results differ only by float rounding order.
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

SOURCE = Path(__file__).with_name("csrc") / "small_gemm.cpp"
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

        digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
        build = cache_dir() / "kernels" / f"small_gemm-{digest}"
        build.mkdir(parents=True, exist_ok=True)
        try:
            return load("dashskip_small_gemm", [str(SOURCE)], extra_cflags=["-O3", "-mavx", "-mfma"],
                        build_directory=str(build), verbose=False)  # fmt: skip
        except (OSError, RuntimeError, ImportError) as err:  # no compiler or ninja, a failed build
            errors = [line for line in str(err).splitlines() if "error" in line.lower()] or [type(err).__name__]
            reason = f"it did not build ({errors[-1].strip()[:300]})"
    warnings.warn(
        f"dashskip's small-row fp32 kernel is off because {reason}; decoding uses torch's F.linear (slower for "
        "2-16 rows, same results up to rounding). Set DASHSKIP_SMALL_GEMM=0 to silence this.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` should run in the packed kernel: few fp32 CPU rows, no autograd, kernel built."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        0 < rows <= SMALL_ROWS
        and x.dtype == weight.dtype == torch.float32
        and x.device.type == weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and extension() is not None
    )


class FewRowLinear:
    """`F.linear` with one weight, through the packed kernel when it pays; the weight is packed on first use
    (which costs a copy of it in memory: no copy where the kernel never runs, as in training)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.panels: torch.Tensor | None = None
        self.packed_from: tuple[int, int] | None = None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not usable(x, self.weight):
            return F.linear(x, self.weight, bias)
        ext = extension()
        source = (self.weight.data_ptr(), self.weight._version)  # repack after `.to()`, `load_state_dict`, ...
        if self.packed_from != source:
            self.panels, self.packed_from = ext.pack(self.weight.detach()), source
        out = ext.linear(x.reshape(-1, x.shape[-1]), self.panels, self.weight.shape[0])
        out = out.view(*x.shape[:-1], self.weight.shape[0])
        return out if bias is None else out + bias
