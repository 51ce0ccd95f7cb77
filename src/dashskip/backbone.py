"""The parts of a transformers decoder LLM the engine drives, behind one small interface.

The decoder layers are the library's own modules, called as they are (or, for the Llama family, their weights
run by `flat.FlatLayer` when a step's rows share one state); this file only knows, per family, where the
pieces live and the two things the engine must compute outside a layer: rotary embeddings per layer type (Gemma3
has a local and a global rope) and a skipped token's K/V under the
'project' rule.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dashskip.errors import DashskipError
from dashskip.flat import FlatLayer, flat_layers
from dashskip.kernels import FewRowInt8Linear, FewRowLinear
from dashskip.states import (
    RowStates,
    State,
    column_major,
    find_rows,
    install_states,
    quantize_int8,
    weight_only_product,
)

HEAD_PRECISIONS = ("full", "bf16", "int8")


@dataclass(frozen=True)
class Family:
    """What differs between the supported families."""

    mid_residual: str  # module whose *input* is the residual stream between attention and MLP
    qk_norm: bool  # q_norm/k_norm applied to the projected heads before rope


FAMILIES: dict[str, Family] = {
    "llama": Family("post_attention_layernorm", qk_norm=False),
    "qwen2": Family("post_attention_layernorm", qk_norm=False),
    "mistral": Family("post_attention_layernorm", qk_norm=False),
    "gemma3_text": Family("pre_feedforward_layernorm", qk_norm=True),
}


class Backbone:
    """A decoder-only causal LM seen as: embed -> L layers -> norm -> head."""

    def __init__(self, model: Any) -> None:
        model_type = getattr(model.config, "model_type", "?")
        if model_type not in FAMILIES:
            raise DashskipError(
                f"unsupported architecture '{model_type}'; dashskip supports: {', '.join(sorted(FAMILIES))}"
            )
        self.model = model
        self.config = model.config
        self.family = FAMILIES[model_type]
        inner = model.model
        self.embed_tokens: nn.Module = inner.embed_tokens
        self.layers: nn.ModuleList = inner.layers
        self.norm: nn.Module = inner.norm
        self.lm_head: nn.Module = model.lm_head
        self.rotary_emb: nn.Module = inner.rotary_emb
        self.num_layers = len(self.layers)
        self.rows: RowStates = find_rows(self.layers) or install_states(self.layers)
        self.flat: list[FlatLayer] | None = flat_layers(self.layers, self.config)
        types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if types is None:
            types = ["sliding_attention" if window else "full_attention"] * self.num_layers
        self.layer_types: list[str] = list(types)
        self.windows: list[int | None] = [window if t == "sliding_attention" else None for t in self.layer_types]
        self._rope_takes_type = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        self.attn_implementation: str = self.config._attn_implementation or "eager"
        self.softcap: float | None = getattr(self.config, "final_logit_softcapping", None)
        if self.lm_head.weight.is_contiguous():  # (tied embeddings share it: a lookup reads either layout)
            self.lm_head.weight.data = column_major(self.lm_head.weight.data)
        self.head = FewRowLinear(self.lm_head.weight)
        self.head_int8 = FewRowInt8Linear()
        self.head_precision = "full"
        self._head_weights: dict[str, tuple[torch.Tensor, ...]] = {}

    def set_head(self, precision: str) -> None:
        """Run the LM head in full (default, exact), bf16, or INT8 weight-only.

        The head reads vocab x hidden weights for every token, a fixed cost layer skipping cannot touch
        (SmolLM2: ~5 ms of ~45 ms per token in fp32); the low-precision heads are options whose quality cost
        is measured in docs/benchmarks.md.
        """
        self.head_weights(precision)
        self.head_precision = precision

    def head_weights(self, precision: str) -> tuple[torch.Tensor, ...]:
        """The low-precision copies of the head weight, made once per precision."""
        if precision not in HEAD_PRECISIONS:
            raise DashskipError(f"unknown head precision '{precision}'; choose one of {', '.join(HEAD_PRECISIONS)}")
        if precision not in self._head_weights:
            weight = self.lm_head.weight.detach()
            self._head_weights[precision] = (
                ()
                if precision == "full"
                else (weight.to(torch.bfloat16),)
                if precision == "bf16"
                else quantize_int8(weight)
            )
        return self._head_weights[precision]

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rope(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin for every layer type present, computed once per step."""
        out = {}
        for layer_type in set(self.layer_types):
            if self._rope_takes_type:
                out[layer_type] = self.rotary_emb(hidden, position_ids, layer_type)
            else:
                out[layer_type] = self.rotary_emb(hidden, position_ids)
        return out

    def logits(self, hidden: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """Logits through the head at `precision` (default: the one set with `set_head`)."""
        precision = precision or self.head_precision
        normed = self.norm(hidden)
        if precision == "full":
            logits = self.head(normed, getattr(self.lm_head, "bias", None))
        elif precision == "bf16":
            logits = F.linear(normed.to(torch.bfloat16), self.head_weights("bf16")[0]).to(normed.dtype)
        else:
            logits = weight_only_product(int(State.INT8), normed, *self.head_weights("int8"), self.head_int8)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def project_kv(
        self, layer_idx: int, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V a skipped token leaves at a layer under the 'project' rule: the layer's own projections of its input."""
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        key = attn.k_proj.run(4, normed).view(shape).transpose(1, 2)
        value = attn.v_proj.run(4, normed).view(shape).transpose(1, 2)
        if self.family.qk_norm:
            key = attn.k_norm(key)
        cos, sin = rope
        # apply_rotary_pos_emb rotates q and k alike; rotate k only by passing it twice.
        key, _ = apply_rotary_pos_emb(key, key, cos, sin)
        return key, value

    def mid_residual_module(self, layer_idx: int) -> nn.Module:
        return getattr(self.layers[layer_idx], self.family.mid_residual)
