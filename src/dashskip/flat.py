"""The Llama-family decoder layer (Llama, Qwen2, Mistral) written out flat, for steps whose rows share one state.

Calling transformers' layer costs ~45 small ops per layer (views, transposes, rope's cat and neg, the cache
update, one product per projection): on SmolLM2 ~0.45 ms of a ~1 ms decode layer, a fixed cost no execution
state removes. Here, as in gpt-fast, the layer is one function of eleven calls: q/k/v and gate/up each run as
one product (weights fused once per state), rope rotates q and k together, K/V go straight into the
preallocated cache, attention is one `scaled_dot_product_attention` with grouped heads. The arithmetic is
the layer's own: outputs equal the transformers layer's up to summation order (tests/test_flat.py).

The engine runs a layer here whenever every row of a step is in the same non-skip state; rows in different
states (a batch whose tokens disagree), planned sublayers and Gemma3 go through the transformers layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dashskip.cache import KVCache
from dashskip.kernels import FewRowInt8Linear, FewRowLinear, extension, usable
from dashskip.states import GEMM_ROWS, State, StatefulLinear, weight_only_product

FLAT_FAMILIES = ("llama", "qwen2", "mistral")


class FusedLinear:
    """Linears that read the same input (q/k/v; gate/up) as one product per state, outputs side by side.

    The fused INT8/INT4 weights are made on first use of the state; the parts' INT8 weights then become row
    slices of the fused one (no second copy), INT4's packing does not allow that (a second copy, 1/8 of fp32).
    """

    def __init__(self, parts: Sequence[StatefulLinear]) -> None:
        self.parts = list(parts)
        self.full = FewRowLinear(*(p.weight for p in self.parts))
        self.int8 = FewRowInt8Linear()
        self.quantized: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def bias(self) -> torch.Tensor | None:
        if all(p.bias is None for p in self.parts):
            return None
        return torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in self.parts])

    def packed(self, state: int) -> tuple[torch.Tensor, torch.Tensor]:
        if state not in self.quantized:
            weights, scales = zip(*(p.packed(state) for p in self.parts), strict=True)
            if state == State.INT8:
                fused = torch.cat(weights), torch.cat(scales)
                # Row-major INT8 rows: each part's weight becomes its slice of the fused one, no second copy.
                for part, own in zip(self.parts, fused[0].split([p.out_features for p in self.parts]), strict=True):
                    part.int8_weight = own
            else:  # the INT4 kernel's packing interleaves rows: pack the fused codes anew (a second, small copy)
                codes = torch.cat([p.int4_codes for p in self.parts]).to(torch.int32)
                fused = torch._convert_weight_to_int4pack_for_cpu(codes, 1), torch.cat(scales, dim=1)
            self.quantized[state] = fused
        return self.quantized[state]

    def __call__(self, state: int, x: torch.Tensor) -> torch.Tensor:
        if state == State.FULL:
            return self.full(x, self.bias())
        if x.numel() // x.shape[-1] >= GEMM_ROWS[state]:  # prefill: each part's dequantized GEMM
            return torch.cat([p.run(state, x) for p in self.parts], dim=-1)
        out = weight_only_product(state, x, *self.packed(state), self.int8)
        bias = self.bias()
        return out if bias is None else out + bias


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rotate(heads: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of (batch, heads, tokens, head_dim), q and k alike."""
    cos, sin = rope[0][:, None], rope[1][:, None]
    half = heads.shape[-1] // 2
    return heads * cos + torch.cat((-heads[..., half:], heads[..., :half]), dim=-1) * sin


class FlatLayer:
    """One decoder layer of the Llama family, run in one execution state for every row of the step."""

    def __init__(self, layer: nn.Module, index: int, config) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.index = index
        self.qkv = FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.kv = FewRowLinear(attn.k_proj.weight, attn.v_proj.weight)  # a skipped token's K/V ('project' rule)
        self.kv_parts = (attn.k_proj, attn.v_proj)
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj])
        self.o_proj, self.down_proj, self.act = attn.o_proj, mlp.down_proj, mlp.act_fn
        self.input_norm, self.mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.silu = config.hidden_act in ("silu", "swish")

    def __call__(
        self,
        state: int,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache,
        plain_causal: bool,
    ) -> torch.Tensor:
        """x (batch, tokens, hidden) -> the layer's output; this step's K/V written to `cache`.

        `plain_causal`: every query sees exactly the keys up to its own position (no padding, no sliding window
        in reach), so few rows can take dashskip's compiled ops; otherwise torch's, with `mask`."""
        if plain_causal and self.silu and usable(x, self.input_norm.weight):
            return self._compiled(state, x, rope, cache)
        batch, tokens, _ = x.shape
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv(state, rms_norm(x, self.input_norm)).view(batch, tokens, h + 2 * kv, d).transpose(1, 2)
        qk = rotate(qkv[:, : h + kv], rope)
        cache.write(self.index, qk[:, h:], qkv[:, h + kv :])
        end = cache.end
        attended = F.scaled_dot_product_attention(
            qk[:, :h],
            cache.keys[self.index][:, :, :end],
            cache.values[self.index][:, :, :end],
            attn_mask=mask,
            is_causal=mask is None and tokens > 1,  # the engine gives no mask only where plain causal is right
            scale=self.scaling,
            enable_gqa=h != kv,
        )
        x = x + self.o_proj.run(state, attended.transpose(1, 2).reshape(batch, tokens, h * d))
        gate_up = self.gate_up(state, rms_norm(x, self.mlp_norm))
        gate, up = gate_up.chunk(2, dim=-1)
        return x + self.down_proj.run(state, self.act(gate) * up)

    def write_skipped_kv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache) -> None:
        """The K/V a token that skips this layer leaves under the 'project' rule: the layer's own key and value
        projections of its input, rotated, written to this step's cache slots (one product for both)."""
        i, kv, d = self.index, self.kv_heads, self.head_dim
        k, v = self.kv_parts
        bias = None if k.bias is None else torch.cat([k.bias, v.bias])
        if usable(x, self.input_norm.weight):
            ops = extension()
            normed = ops.rms_norm(x, self.input_norm.weight, self.input_norm.variance_epsilon)
            cos, sin = rope[0].contiguous(), rope[1].contiguous()
            ops.rope_and_cache(self.kv(normed, bias), cos, sin, cache.keys[i], cache.values[i], 0, cache.start)
            return
        batch, tokens, _ = x.shape
        both = self.kv(rms_norm(x, self.input_norm), bias).view(batch, tokens, 2 * kv, d).transpose(1, 2)
        cache.write(i, rotate(both[:, :kv], rope), both[:, kv:])

    def _compiled(
        self, state: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache
    ) -> torch.Tensor:
        """The same layer with its small ops in `csrc/layer_ops.cpp`: eleven calls in all."""
        ops, i = extension(), self.index
        qkv = self.qkv(state, ops.rms_norm(x, self.input_norm.weight, self.input_norm.variance_epsilon))
        cos, sin = rope[0].contiguous(), rope[1].contiguous()
        q = ops.rope_and_cache(qkv, cos, sin, cache.keys[i], cache.values[i], self.heads, cache.start)
        attended = ops.causal_attention(q, cache.keys[i], cache.values[i], cache.start, self.scaling)
        x = x + self.o_proj.run(state, attended)
        gate_up = self.gate_up(state, ops.rms_norm(x, self.mlp_norm.weight, self.mlp_norm.variance_epsilon))
        return x + self.down_proj.run(state, ops.silu_mul(gate_up))


def flat_layers(layers: nn.ModuleList, config) -> list[FlatLayer] | None:
    """Flat versions of `layers` for the families that have one, else None."""
    if getattr(config, "model_type", None) not in FLAT_FAMILIES:
        return None
    return [FlatLayer(layer, i, config) for i, layer in enumerate(layers)]
