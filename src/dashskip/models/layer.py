"""The decoder layer the engine runs, written out flat (gpt-fast style) over the model's own weights.

A family file (`llama.py`, `gemma3.py`) says what its layer is made of: which norms sit where (before and after
each sublayer, on q and k), the MLP's activation, where the weights live. This module runs any such layer in
the execution states of a step: q/k/v and gate/up each one product (`core.linear.Linear`, fused), rope on q and
k together, K/V straight into the preallocated cache, grouped-query attention in one call. Rows in different
states are grouped per projection; a skipped row's output is `scale * x` and its K/V follow the engine's rule
('project': the layer's own K/V projections of its input, normed and rotated; 'copy': the layer below's).
For few rows (or a decode step's rows, one token each) with a plain causal mask the small ops are compiled
calls (`csrc/layer_ops.cpp`), and rows of one state run the whole layer as one compiled call.

The arithmetic is the transformers layer's own: outputs equal it up to summation order (tests/test_layers.py).
The transformers modules are only read (weights, epsilons), never called or changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from dashskip.core import kernels as K
from dashskip.core.cache import KVRule
from dashskip.core.context import Rows, StepContext
from dashskip.core.decisions import SublayerSkip
from dashskip.core.linear import Linear
from dashskip.core.states import State, spec
from dashskip.errors import DashskipError


@dataclass
class Norm:
    """RMS norm `weight * x / rms(x)`; families whose norm is `(1 + w)` pass that as the weight."""

    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        if compiled:
            return K.extension().rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rotate(heads: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of (batch, heads, tokens, head_dim), q and k alike."""
    cos, sin = rope[0][:, None], rope[1][:, None]
    half = heads.shape[-1] // 2
    return heads * cos + torch.cat((-heads[..., half:], heads[..., :half]), dim=-1) * sin


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": F.gelu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise DashskipError(f"MLP activation '{name}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass
class LayerParts:
    """What a family's layer is made of, read from the transformers layer."""

    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    o: torch.nn.Linear
    gate: torch.nn.Linear
    up: torch.nn.Linear
    down: torch.nn.Linear
    attn_norm: Norm
    mlp_norm: Norm
    act: str
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    window: int | None
    q_norm: Norm | None = None  # per-head norms of q and k before rope (Gemma3)
    k_norm: Norm | None = None
    post_attn_norm: Norm | None = None  # norms of each sublayer's output before the residual add (Gemma3)
    post_mlp_norm: Norm | None = None


def _linear(*parts: torch.nn.Linear) -> Linear:
    return Linear([p.weight for p in parts], [p.bias for p in parts])


class DecoderLayer:
    """One decoder layer run in the states of a step's rows; writes this step's K/V to the cache."""

    def __init__(self, index: int, parts: LayerParts) -> None:
        self.index = index
        self.qkv = _linear(parts.q, parts.k, parts.v)
        self.kv = _linear(parts.k, parts.v)  # a skipped token's K/V under the 'project' rule
        self.o, self.gate_up, self.down = _linear(parts.o), _linear(parts.gate, parts.up), _linear(parts.down)
        self.attn_norm, self.mlp_norm = parts.attn_norm, parts.mlp_norm
        self.q_norm, self.k_norm = parts.q_norm, parts.k_norm
        self.post_attn_norm, self.post_mlp_norm = parts.post_attn_norm, parts.post_mlp_norm
        self.act_name, self.act = parts.act, activation(parts.act)
        self.heads, self.kv_heads, self.head_dim = parts.heads, parts.kv_heads, parts.head_dim
        self.scaling, self.window = parts.scaling, parts.window
        self.q_width = parts.heads * parts.head_dim
        self.fused: dict[tuple, Any] = {}  # (state, row bucket, kernel choices) -> the layer as one compiled call
        self.fused_from: tuple | None = None  # the projections' sources the fused layers were built from

    def projections(self) -> tuple[Linear, Linear, Linear, Linear]:
        """What the one-call layer multiplies with: q/k/v, o, gate/up, down."""
        return self.qkv, self.o, self.gate_up, self.down

    def linears(self) -> dict[str, Linear]:
        return {"qkv": self.qkv, "o": self.o, "gate_up": self.gate_up, "down": self.down, "kv": self.kv}

    def __call__(
        self,
        rows: Rows,
        x: torch.Tensor,
        step: StepContext,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        scale: torch.Tensor,
        plan: SublayerSkip | None = None,
    ) -> torch.Tensor:
        """x (batch, tokens, hidden) -> the layer's output, each row in its state; this step's K/V to the cache."""
        if plan is not None:
            return self._planned(plan, x, step, rope, mask)
        if rows.uniform is not None and spec(rows.uniform).skips:
            return self.skip(x, step, rope, scale)
        if rows.uniform is not None and step.plain_causal and K.layer_rows(x):
            return self._compiled(rows.uniform, x, step, rope)
        skipped = rows.skipped() if rows.any_skipped() else None
        mid = x + self._attention(rows, x, step, rope, mask, skipped)
        out = mid + self._mlp(rows, mid)
        return out if skipped is None else torch.where(skipped[..., None], x * scale, out)

    def skip(
        self, x: torch.Tensor, step: StepContext, rope: tuple[torch.Tensor, torch.Tensor], scale: torch.Tensor
    ) -> torch.Tensor:
        """Every row skips: `scale * x`, K/V by the engine's rule."""
        if step.kv_rule is KVRule.COPY:
            step.cache.copy_from_below(self.index)
        else:
            self.write_skipped_kv(x, step, rope)
        return x * scale

    def write_skipped_kv(self, x: torch.Tensor, step: StepContext, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The 'project' rule: the layer's own K/V projections of the input, normed and rotated like any key."""
        cache, i = step.cache, self.index
        compiled = K.layer_rows(x) and self.k_norm is None
        kv = self.kv(State.FULL, self.attn_norm(x, compiled))
        if compiled:
            cos, sin = rope[0].contiguous(), rope[1].contiguous()
            K.extension().rope_and_cache(kv, cos, sin, cache.keys[i], cache.values[i], 0, cache.start)
            return
        batch, tokens, _ = x.shape
        both = kv.view(batch, tokens, 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        key, value = both[:, : self.kv_heads], both[:, self.kv_heads :]
        if self.k_norm is not None:
            key = self.k_norm(key)
        cache.write(i, rotate(key, rope), value)

    def _attention(
        self,
        rows: Rows,
        x: torch.Tensor,
        step: StepContext,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        skipped: torch.Tensor | None,
    ) -> torch.Tensor:
        compiled = step.plain_causal and K.layer_rows(x)  # a decode step's rows in mixed states
        normed = self.attn_norm(x, compiled)
        qkv = self.qkv.rows(rows, normed)
        if skipped is not None and step.kv_rule is KVRule.PROJECT:
            index = torch.nonzero(skipped.reshape(-1)).squeeze(1)
            flat = qkv.view(-1, qkv.shape[-1])
            flat[index, self.q_width :] = self.kv(State.FULL, normed.reshape(-1, normed.shape[-1])[index])
        if compiled:
            attended = self._attend_compiled(qkv, step, rope, skipped)
        else:
            attended = self._attend(qkv, step, rope, mask, skipped)
        out = self.o.rows(rows, attended)
        return out if self.post_attn_norm is None else self.post_attn_norm(out)

    def _attend(
        self,
        qkv: torch.Tensor,
        step: StepContext,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        skipped: torch.Tensor | None,
    ) -> torch.Tensor:
        """q/k/v rows (batch, tokens, (H + 2 KV) * Dh) -> attention's output (batch, tokens, H * Dh), this step's
        K/V written to the cache (a skipped row's copied from below under the 'copy' rule): torch's ops."""
        batch, tokens, _ = qkv.shape
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        heads = qkv.view(batch, tokens, h + 2 * kv, d).transpose(1, 2)
        q, k, v = heads[:, :h], heads[:, h : h + kv], heads[:, h + kv :]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, rope), rotate(k, rope)
        cache = step.cache
        cache.write(self.index, k, v)
        if skipped is not None and step.kv_rule is KVRule.COPY:
            cache.copy_from_below(self.index, skipped)
        keys, values = cache.filled(self.index)
        if keys.dtype != q.dtype:  # a 16-bit cache: widened for torch's op (the compiled path reads it as it is)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        attended = F.scaled_dot_product_attention(
            q, keys, values,
            attn_mask=mask,
            is_causal=mask is None and tokens > 1,  # the engine gives no mask only where plain causal is right
            scale=self.scaling,
            enable_gqa=h != kv,
        )  # fmt: skip
        return attended.transpose(1, 2).reshape(batch, tokens, h * d)

    def _attend_compiled(
        self,
        qkv: torch.Tensor,
        step: StepContext,
        rope: tuple[torch.Tensor, torch.Tensor],
        skipped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`_attend` as compiled calls (a plain causal mask; `K.layer_rows`): q/k normed per head, rope and the
        cache write in one, causal attention over the cache in one."""
        i, cache, ops = self.index, step.cache, K.extension()
        if self.q_norm is not None:
            self._norm_heads(qkv)
        cos, sin = rope[0].contiguous(), rope[1].contiguous()
        q = ops.rope_and_cache(qkv, cos, sin, cache.keys[i], cache.values[i], self.heads, cache.start)
        if skipped is not None and step.kv_rule is KVRule.COPY:
            cache.copy_from_below(i, skipped)
        return ops.causal_attention(q, cache.keys[i], cache.values[i], cache.start, self.scaling, step.key_begins,
                                    self.window or 0)

    def _mlp(self, rows: Rows, mid: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up.rows(rows, self.mlp_norm(mid)).chunk(2, dim=-1)
        out = self.down.rows(rows, self.act(gate) * up)
        return out if self.post_mlp_norm is None else self.post_mlp_norm(out)

    def _compiled(
        self, state: int, x: torch.Tensor, step: StepContext, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Few rows (or a decode step's rows) in one state with a plain causal mask: the whole layer as one
        compiled call where every projection's chosen kernel has a native form, else the small ops as compiled
        calls one by one (the same ops and kernels either way, so the same output)."""
        i, cache = self.index, step.cache
        fused = self.one_call(state, x)
        if fused is not None:
            cos, sin = rope[0].contiguous(), rope[1].contiguous()
            return fused(x, cos, sin, cache.keys[i], cache.values[i], cache.start, step.key_begins)
        qkv = self.qkv(state, self.attn_norm(x, compiled=True))
        out = self.o(state, self._attend_compiled(qkv, step, rope))
        mid = x + (out if self.post_attn_norm is None else self.post_attn_norm(out, compiled=True))
        gate_up = self.gate_up(state, self.mlp_norm(mid, compiled=True))
        if self.act_name in ("silu", "swish"):
            hidden = K.extension().silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = self.act(gate) * up
        out = self.down(state, hidden)
        return mid + (out if self.post_mlp_norm is None else self.post_mlp_norm(out, compiled=True))

    def one_call(self, state: int, x: torch.Tensor) -> Any | None:
        """The layer as one compiled call for `x`'s rows in `state` (csrc/fused_layer.cpp), built on first use from
        the kernels measured fastest for each projection; None where one of them has no native form. Rebuilt when
        a weight or the kernel choices change."""
        projections = self.projections()
        sources = tuple(p.sources() for p in projections)
        if sources != self.fused_from:
            self.fused.clear()
            self.fused_from = sources
        rows = x.numel() // x.shape[-1]
        key = (state, K.row_bucket(rows), K.CHOICE.generation, K.activations(), torch.get_num_threads())
        if key not in self.fused:
            self.fused[key] = self._build_fused(state, rows, projections)
        return self.fused[key]

    def _build_fused(self, state: int, rows: int, projections: tuple[Linear, ...]) -> Any | None:
        natives = [p.native(state, rows) for p in projections]
        if any(n is None for n in natives):
            return None
        norms = (self.attn_norm, self.mlp_norm, self.q_norm, self.k_norm, self.post_attn_norm, self.post_mlp_norm)
        kinds, tensors, outs, biases = (list(column) for column in zip(*natives, strict=True))
        return K.extension().FusedLayer(
            kinds, tensors, outs, biases,
            [None if n is None else n.weight for n in norms], [0.0 if n is None else n.eps for n in norms],
            self.act_name, self.heads, self.kv_heads, self.head_dim, self.scaling, self.window or 0,
        )  # fmt: skip

    def _norm_heads(self, qkv: torch.Tensor) -> None:
        """q and k of a fused q/k/v row normed per head, in place (Gemma3's qk-norm)."""
        d, qw, kw = self.head_dim, self.q_width, self.kv_heads * self.head_dim
        q = qkv[..., :qw].unflatten(-1, (self.heads, d))
        k = qkv[..., qw : qw + kw].unflatten(-1, (self.kv_heads, d))
        q.copy_(self.q_norm(q))
        k.copy_(self.k_norm(k))

    def _planned(
        self,
        plan: SublayerSkip,
        x: torch.Tensor,
        step: StepContext,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The layer with its planned sublayers skipped (a skipped one: its input times its scale), the rest in full.

        A skipped attention writes no K/V: the plan holds for every token of the session, so no query ever reads
        this layer's cache.
        """
        full = Rows(int(State.FULL))
        mid = x * plan.attn if plan.attn is not None else x + self._attention(full, x, step, rope, mask, None)
        return mid * plan.mlp if plan.mlp is not None else mid + self._mlp(full, mid)
