"""How each execution state packs a linear and runs it: one handler per scheme (gpt-fast's quantization handlers).

A handler turns the fp32 weight(s) of a projection into its form once (`quantize`), lists the kernels that can
run a call (`kernels`: torch's op always, dashskip's compiled ones where they apply), lays the form out for a
kernel (`prepare`, made once per kernel actually chosen) and runs it (`run`). Which kernel runs is measured per
host (`kernels.CHOICE`), never assumed. Several weights that read the same input (q/k/v, gate/up) are one
projection: their outputs side by side from one product.

The INT8 and INT4 states compute in one of two ways (`activations()`, `DASHSKIP_ACTIVATIONS`):
- `int8` (the default): the rows of x are quantized to int8 in blocks of 64 values (`quantize_rows`) and
  multiplied by the integer weights, as llama.cpp's Q8_0 / Q4_0 paths do: for few rows by dashskip's VNNI kernels
  (csrc/int_dot.cpp, integer sums), otherwise by torch's kernels on the same int8 rows (which they round to
  bf16 once more, and INT4's dequantized weights too), so the kernel choice changes a result only by float
  rounding.
- `bf16`: the weight-only arithmetic of torch's kernels (bf16 activations, fp32 sums, bf16 outputs): more
  accurate, and for few rows slower.
Under autograd both states run the bf16 GEMM on the dequantized weight and the unrounded rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from dashskip.core import kernels as K
from dashskip.core.kernels import activations  # the setting lives with the kernel choice it keys
from dashskip.errors import DashskipError

INT4_GROUP_SIZE = 64  # not 32: SmolLM2's Q4_1 GGUF uses 32-blocks, and group 32 would reproduce it exactly


ACTIVATION_BLOCK = 64  # values per activation scale (llama.cpp's Q8_0: 32); one scale per row cost 2% perplexity


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows rounded as the VNNI kernels round them, dequantized: symmetric int8 per block of 64 values (scale =
    max|x| / 127 over the block, 1 for a zero block), division and round-half-even, so q is the same bit for bit."""
    rows, width = x.shape
    pad = -width % ACTIVATION_BLOCK
    blocks = F.pad(x, (0, pad)).view(rows, -1, ACTIVATION_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return (torch.round(blocks / scale) * scale).view(rows, -1)[:, :width]


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    """What the INT8 and INT4 states multiply: the rounded rows with int8 activations, x itself with bf16."""
    return quantize_rows(x) if activations() == "int8" and not K.needs_grad(x) else x


def _vnni_rows(x: torch.Tensor) -> bool:
    return activations() == "int8" and K.compiled_rows(x, K.INT_DOT_ROWS) and K.vnni()


# The integer dot-product kernels in their two prefetch plans (int_dot.cpp): the same packed layout, measured apart.
VNNI = ("vnni", "vnni_far")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: returns (int8 weight (N, K), bf16 scales (N,))."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q.contiguous(), scales.to(torch.bfloat16)


def int4_codes(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """Asymmetric grouped INT4: codes (N, K) in 0..15, scales and minima (N, K/g); w ~ code * scale + minimum."""
    w = weight.detach().float().contiguous()
    n, k = w.shape
    if k % group_size:
        raise DashskipError(f"INT4 needs in_features divisible by the group size {group_size}; got {k}")
    groups = w.reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    codes = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, 15).reshape(n, k)
    return codes.to(torch.uint8), scales, lo


def _cat(weights: list[torch.Tensor]) -> torch.Tensor:
    return weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights])


def _bf16_gemm(x: torch.Tensor, weight_bf16: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(torch.bfloat16), weight_bf16).to(x.dtype)


class Handler:
    """Base: a scheme with only torch's op. Subclasses define the form and the extra kernels."""

    name = "base"

    def quantize(self, weights: list[torch.Tensor]) -> Any:
        raise NotImplementedError

    def kernels(self, x: torch.Tensor) -> list[str]:
        return ["torch"]

    def prepare(self, kernel: str, form: Any) -> Any:
        return form

    def run(self, kernel: str, prepared: Any, x: torch.Tensor, out_features: int) -> torch.Tensor:
        """x (rows, in) -> (rows, out_features); `prepared` as `prepare(kernel, ...)` made it."""
        raise NotImplementedError

    def native(self, kernel: str, prepared: Any) -> tuple[str, list[torch.Tensor]] | None:
        """How the compiled decoder layer (csrc/fused_layer.cpp) runs this kernel: its kind there and the tensors
        it takes, computing exactly what `run` computes; None where only `run` can (the layer then runs op by op)."""
        return None

    def dequantize(self, form: Any) -> torch.Tensor:
        """The fp32 weight (N, K) this scheme multiplies with (an estimate of its error needs it)."""
        raise NotImplementedError

    def nbytes(self, form: Any) -> int:
        """Bytes of weights one product reads."""
        tensors = form if isinstance(form, tuple | list) else (form,)
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# oneDNN reorders a weight for a row count: 8 (batched decode, verification) measured as fast as each count's own
# layout on 1-16 rows of SmolLM2's shapes, so one reordered copy serves every row count.
ONEDNN_ROWS = 8
# Not offered for one row (a single stream's decode): there it never beat torch's and the packed kernel in steady
# decode (`benchmarks/batched_step.py`: 33.6 ms a full step without it, 35.9 with it among the choices), while a
# noisy measurement could still pick it.
ONEDNN_FROM_ROWS = 2


class FullPrecision(Handler):
    """The weights as they are: torch's `F.linear`, dashskip's packed fp32 kernel for few rows, or oneDNN's product
    on the weight reordered once (`kernels.onednn`)."""

    name = "full"

    def quantize(self, weights: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(weights)  # references to the model's own weights: no copy, never modified

    def dequantize(self, form: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return _cat(list(form)).float().clone()  # never the model's own tensor

    def kernels(self, x: torch.Tensor) -> list[str]:
        names = ["torch", "packed"] if K.compiled_rows(x) else ["torch"]
        rows = x.numel() // max(x.shape[-1], 1)
        usable = x.dtype == torch.float32 and x.device.type == "cpu" and not K.needs_grad(x)
        if rows >= ONEDNN_FROM_ROWS and usable and K.mode() == "measured" and K.onednn():
            names.append("onednn")
        return names

    def prepare(self, kernel: str, form: tuple[torch.Tensor, ...]) -> Any:
        if kernel == "onednn":
            return torch.ops.mkldnn._reorder_linear_weight(_cat(list(form)), ONEDNN_ROWS)
        return K.extension().pack(_cat(list(form))) if kernel == "packed" else form

    def native(self, kernel: str, prepared: Any) -> tuple[str, list[torch.Tensor]] | None:
        return (kernel, [prepared]) if kernel in ("packed", "onednn") else ("torch", list(prepared))

    def run(self, kernel: str, prepared: Any, x: torch.Tensor, out_features: int) -> torch.Tensor:
        if kernel == "packed":
            return K.extension().linear(x, prepared, out_features)
        if kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), prepared, None, "none", [], None)
        if len(prepared) == 1:
            return F.linear(x, prepared[0])
        return torch.cat([F.linear(x, w) for w in prepared], dim=-1)


@dataclass
class Int8Form:
    weight: torch.Tensor  # (N, K) int8
    scales: torch.Tensor  # (N,) bf16


class Int8WeightOnly(Handler):
    """Symmetric per-channel INT8 weights. Kernels: torch's weight-only kernel, dashskip's packed one (few rows,
    AVX-512), a bf16 GEMM on the weight dequantized for the call (prefill), and with int8 activations dashskip's
    VNNI kernel (few rows; the others then run on the rounded rows)."""

    name = "int8"

    def quantize(self, weights: list[torch.Tensor]) -> Int8Form:
        return Int8Form(*quantize_int8(_cat(weights)))

    def dequantize(self, form: Int8Form) -> torch.Tensor:
        return form.weight.float() * form.scales.float()[:, None]

    def kernels(self, x: torch.Tensor) -> list[str]:
        if K.needs_grad(x):
            return ["gemm"]
        names = ["torch", "gemm"]
        if K.compiled_rows(x) and K.avx512():
            names.append("packed")
        return [*names, *VNNI] if _vnni_rows(x) else names

    def prepare(self, kernel: str, form: Int8Form) -> Any:
        if kernel == "packed":
            return tuple(K.extension().pack_int8(form.weight, form.scales))
        if kernel in VNNI:
            return tuple(K.extension().pack_int8_vnni(form.weight, form.scales))
        return form

    def native(self, kernel: str, prepared: Any) -> tuple[str, list[torch.Tensor]] | None:
        return (f"int8_{kernel}", list(prepared)) if kernel in VNNI else None

    def run(self, kernel: str, prepared: Any, x: torch.Tensor, out_features: int) -> torch.Tensor:
        if kernel in VNNI:
            return K.extension().linear_int8_vnni(x, *prepared, out_features, kernel == "vnni_far")
        x = _int8_rows(x)
        if kernel == "packed":
            return K.extension().linear_int8(x, *prepared, out_features)
        if kernel == "gemm":
            return _bf16_gemm(x, prepared.weight.to(torch.bfloat16) * prepared.scales[:, None])
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), prepared.weight, prepared.scales).to(x.dtype)

    def nbytes(self, form: Int8Form) -> int:
        return super().nbytes((form.weight, form.scales))


@dataclass
class Int4Form:
    codes: torch.Tensor  # (N, K) uint8 in 0..15
    scales: torch.Tensor  # (N, K / group)
    minima: torch.Tensor  # (N, K / group)


class Int4WeightOnly(Handler):
    """Asymmetric INT4 weights in groups of 64 along the input. Kernels: torch's weight-only INT4 kernel, a bf16
    GEMM on the weight dequantized for the call (prefill), and with int8 activations dashskip's VNNI kernel (few
    rows; the torch kernels then run on the rounded rows)."""

    name = "int4"

    def quantize(self, weights: list[torch.Tensor]) -> Int4Form:
        return Int4Form(*int4_codes(_cat(weights)))

    def dequantize(self, form: Int4Form) -> torch.Tensor:
        n, k = form.codes.shape
        groups = form.codes.view(n, -1, INT4_GROUP_SIZE).float()
        return (groups * form.scales[..., None] + form.minima[..., None]).view(n, k)

    def kernels(self, x: torch.Tensor) -> list[str]:
        if K.needs_grad(x):
            return ["gemm"]
        return ["torch", "gemm", *VNNI] if _vnni_rows(x) else ["torch", "gemm"]

    def prepare(self, kernel: str, form: Int4Form) -> Any:
        if kernel in VNNI:
            return tuple(K.extension().pack_int4_vnni(form.codes, form.scales, form.minima))
        if kernel == "torch":
            packed = torch._convert_weight_to_int4pack_for_cpu(form.codes.to(torch.int32), 1)
            zeros = form.minima + form.scales * 8.0  # the kernel computes (code - 8) * scale + zero
            scales_zeros = torch.stack([form.scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            return packed, scales_zeros
        return form

    def native(self, kernel: str, prepared: Any) -> tuple[str, list[torch.Tensor]] | None:
        return (f"int4_{kernel}", list(prepared)) if kernel in VNNI else None

    def run(self, kernel: str, prepared: Any, x: torch.Tensor, out_features: int) -> torch.Tensor:
        if kernel in VNNI:
            return K.extension().linear_int4_vnni(x, *prepared, out_features, kernel == "vnni_far")
        x = _int8_rows(x)
        if kernel == "torch":
            packed, scales_zeros = prepared
            return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, INT4_GROUP_SIZE, scales_zeros).to(
                x.dtype
            )
        n = prepared.codes.shape[0]
        codes = prepared.codes.view(n, -1, INT4_GROUP_SIZE).float()  # bf16 arithmetic is slow on CPUs
        weight = torch.addcmul(prepared.minima[..., None], codes, prepared.scales[..., None]).view(n, -1)
        return _bf16_gemm(x, weight.to(torch.bfloat16))

    def nbytes(self, form: Int4Form) -> int:
        return form.codes.numel() // 2 + 2 * 2 * form.scales.numel()  # packed nibbles, bf16 scales and zeros


class BF16WeightOnly(Handler):
    """bf16 weights and activations, fp32 out (the LM head's `bf16` precision; a template for a bf16 state)."""

    name = "bf16"

    def quantize(self, weights: list[torch.Tensor]) -> torch.Tensor:
        return _cat(weights).to(torch.bfloat16)

    def run(self, kernel: str, prepared: torch.Tensor, x: torch.Tensor, out_features: int) -> torch.Tensor:
        return _bf16_gemm(x, prepared)
