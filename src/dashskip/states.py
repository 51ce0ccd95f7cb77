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


class State(IntEnum):
    SKIP = 0
    INT4 = 1
    INT8 = 2
    FULL = 4


VALID_STATES = tuple(int(s) for s in State)
INT4_GROUP_SIZE = 64  # not 32: SmolLM2's Q4_1 GGUF uses 32-blocks, and group 32 would reproduce it exactly


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


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grouped INT4 in the CPU kernel's layout: (packed weight, scales_and_zeros (K/g, N, 2))."""
    w = weight.detach().float()
    n, k = w.shape
    if k % group_size:
        raise DashskipError(f"INT4 needs in_features divisible by the group size {group_size}; got {k}")
    groups = w.reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    zeros = lo + scales * 8.0
    q = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros


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
        self.weight = linear.weight
        self.bias = linear.bias
        self.rows = rows
        self.keeps_kv = keeps_kv
        q8, s8 = quantize_int8(linear.weight)
        self.register_buffer("int8_weight", q8, persistent=False)
        self.register_buffer("int8_scales", s8, persistent=False)
        q4, sz4 = quantize_int4(linear.weight)
        self.register_buffer("int4_weight", q4, persistent=False)
        self.register_buffer("int4_scales_zeros", sz4, persistent=False)

    def run(self, state: int, x: torch.Tensor) -> torch.Tensor:
        if state == State.FULL or (state == State.SKIP and self.keeps_kv):
            return F.linear(x, self.weight, self.bias)
        if state == State.SKIP:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if state == State.INT8:
            out = torch._weight_int8pack_mm(flat, self.int8_weight, self.int8_scales)
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat, self.int4_weight, INT4_GROUP_SIZE, self.int4_scales_zeros)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

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
