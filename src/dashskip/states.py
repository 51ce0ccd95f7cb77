"""Execution states of a layer and the weight-only quantized linears behind states 1 and 2.

Every `nn.Linear` of a decoder layer is swapped (in place, like torchao's
`quantize_`) for a `StatefulLinear` that keeps the original weight and packed
INT8/INT4 copies. Which copy a row of activations uses is set per call through
a shared `RowStates`, so one call of the unmodified transformers decoder layer
can serve tokens in different states: attention is the library's own, and the
keys/values every token leaves are consistent with the state it ran in.

The CPU kernels (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`)
only pay off with bf16 activations, so quantized rows are cast to bf16 and back.
"""

from __future__ import annotations

from enum import IntEnum

import torch
from torch import nn
from torch.nn import functional as F

from dashskip.errors import DashskipError
from dashskip.kernels import FewRowInt8Linear, FewRowLinear, usable


class State(IntEnum):
    SKIP = 0
    INT4 = 1
    INT8 = 2
    FULL = 4


VALID_STATES = tuple(int(s) for s in State)
INT4_GROUP_SIZE = 64  # not 32: SmolLM2's Q4_1 GGUF uses 32-blocks, and group 32 would reproduce it exactly
# From this many rows on, a quantized linear runs as a bf16 GEMM on weights dequantized for the call (same
# values): the weight-only kernels cost about one GEMV per row, so they lose to a GEMM in prefill. The INT4
# crossover is later because unpacking its groups costs more (measured on SmolLM2's shapes, docs/speed.md).
GEMM_ROWS = {1: 64, 2: 32}


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix stored as (in, out): CPU BLAS reads it about twice as fast for one-row products
    (decode), and F.linear then runs as `x @ W_t` with no copy. Values, shape and autograd are unchanged."""
    return weight.t().contiguous().t()


def check_state(value: int) -> int:
    if int(value) not in VALID_STATES:
        raise DashskipError(f"invalid execution state {value!r}; states are 0 (skip), 1 (int4), 2 (int8), 4 (full)")
    return int(value)


def check_state_tensor(states: torch.Tensor) -> None:
    bad = ~torch.isin(states, torch.tensor(VALID_STATES, device=states.device))
    if bool(bad.any()):
        value = int(states[bad][0])
        check_state(value)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: returns (int8 weight (N, K), bf16 scales (N,))."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q.contiguous(), scales.to(torch.bfloat16)


def int4_codes(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """Asymmetric grouped INT4: codes (N, K) in 0..15, scales and minima (N, K/g); w ~ code * scale + minimum."""
    w = weight.detach().float().contiguous()  # the linears' weights are stored column-major
    n, k = w.shape
    if k % group_size:
        raise DashskipError(f"INT4 needs in_features divisible by the group size {group_size}; got {k}")
    groups = w.reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    codes = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, 15).reshape(n, k)
    return codes.to(torch.uint8), scales, lo


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, ...]:
    """INT4 in the CPU kernel's layout: (packed weight, scales_and_zeros (K/g, N, 2) bf16), plus (codes (N, K)
    uint8, scales (N, K/g), minima (N, K/g)) for the dequantized GEMM path: the kernel's packed
    layout cannot be read back."""
    codes, scales, lo = int4_codes(weight, group_size)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    zeros = lo + scales * 8.0  # the kernel computes (code - 8) * scale + zero
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros, codes, scales, lo


def weight_only_product(
    state: int, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, int8: FewRowInt8Linear
) -> torch.Tensor:
    """`x @ W^T` for few rows: INT8 through dashskip's kernel where it runs (`int8` holds its packed copy), else
    torch's weight-only INT8 or INT4 kernel (bf16 activations, `x`'s dtype out); `(weight, scales)` as
    `StatefulLinear.packed` gives them."""
    if state == State.INT8 and usable(x, weight):
        return int8(x, weight, scales)
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if state == State.INT8:
        out = torch._weight_int8pack_mm(flat, weight, scales)
    else:
        out = torch._weight_int4pack_mm_for_cpu(flat, weight, INT4_GROUP_SIZE, scales)
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


class RowStates:
    """The states of the rows a layer is processing right now, shared by all linears of the backbone.

    `uniform` is set when every row has the same state (the common, fast case);
    otherwise `groups` lists (state, row indices) so each linear gathers the
    rows of one state, runs them together and scatters the results back.
    """

    def __init__(self) -> None:
        self.uniform: int | None = int(State.FULL)
        self.groups: list[tuple[int, torch.Tensor]] = []

    def set_uniform(self, state: int) -> None:
        self.uniform = int(state)
        self.groups = []

    def set_rows(self, states: torch.Tensor) -> None:
        flat = states.reshape(-1)
        present = torch.unique(flat).tolist()
        if len(present) == 1:
            self.set_uniform(present[0])
            return
        self.uniform = None
        self.groups = [(int(s), torch.nonzero(flat == s).squeeze(1)) for s in present]


class StatefulLinear(nn.Linear):
    """An `nn.Linear` that also runs as INT8 or INT4 weight-only, row by row, as `RowStates` says.

    `keeps_kv` marks the key/value projections: a skipped token still needs its
    K/V there (the 'project' rule), so skipped rows run in full for them and
    produce zeros everywhere else (their output is discarded anyway).
    """

    def __init__(self, linear: nn.Linear, rows: RowStates, keeps_kv: bool) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        linear.weight.data = column_major(linear.weight.data)
        self.weight = linear.weight
        self.bias = linear.bias
        self.full = FewRowLinear(self.weight)
        self.int8 = FewRowInt8Linear()
        self.rows = rows
        self.keeps_kv = keeps_kv
        q8, s8 = quantize_int8(linear.weight)
        self.register_buffer("int8_weight", q8, persistent=False)
        self.register_buffer("int8_scales", s8, persistent=False)
        q4, sz4, codes, scales, minima = quantize_int4(linear.weight)
        self.register_buffer("int4_weight", q4, persistent=False)
        self.register_buffer("int4_scales_zeros", sz4, persistent=False)
        self.register_buffer("int4_codes", codes, persistent=False)
        self.register_buffer("int4_scales", scales, persistent=False)
        self.register_buffer("int4_minima", minima, persistent=False)

    def dequantized(self, state: int) -> torch.Tensor:
        """The bf16 (out, in) weight a quantized state computes with, for GEMM-sized calls."""
        if state == State.INT8:
            return self.int8_weight.to(torch.bfloat16) * self.int8_scales[:, None]
        codes = self.int4_codes.view(self.out_features, -1, INT4_GROUP_SIZE).float()  # bf16 arithmetic is slow
        weight = torch.addcmul(self.int4_minima[..., None], codes, self.int4_scales[..., None])
        return weight.view(self.out_features, -1).to(torch.bfloat16)

    def run(self, state: int, x: torch.Tensor) -> torch.Tensor:
        if state == State.FULL or (state == State.SKIP and self.keeps_kv):
            return self.full(x, self.bias)
        if state == State.SKIP:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        if x.numel() // self.in_features >= GEMM_ROWS[state]:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            out = F.linear(flat, self.dequantized(state)).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            out = weight_only_product(state, x, *self.packed(state), self.int8)
        return out if self.bias is None else out + self.bias

    def packed(self, state: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight-only kernel's (weight, scales) for a quantized state."""
        if state == State.INT8:
            return self.int8_weight, self.int8_scales
        return self.int4_weight, self.int4_scales_zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows.uniform is not None:
            return self.run(rows.uniform, x)
        flat = x.reshape(-1, self.in_features)
        out = flat.new_empty(flat.shape[0], self.out_features)
        for state, index in rows.groups:
            out[index] = self.run(state, flat[index])
        return out.reshape(*x.shape[:-1], self.out_features)


def install_states(layers: nn.ModuleList, kv_names: tuple[str, ...] = ("k_proj", "v_proj")) -> RowStates:
    """Swap every linear of `layers` for a `StatefulLinear`; return the `RowStates` that steers them."""
    rows = RowStates()
    for layer in layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, StatefulLinear(child, rows, keeps_kv=name in kv_names))
    return rows


def find_rows(layers: nn.ModuleList) -> RowStates | None:
    """The `RowStates` already installed on `layers`, if any (so applying twice is harmless)."""
    for module in layers.modules():
        if isinstance(module, StatefulLinear):
            return module.rows
    return None
