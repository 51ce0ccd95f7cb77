"""The Llama family (Llama, Qwen2, Mistral): pre-norm layers, SiLU-gated MLP, one rope, optional q/k/v biases
(Qwen2) and sliding windows (Mistral). What differs from other families is all in `layer_parts`."""

from __future__ import annotations

from typing import Any

from torch import nn

from dashskip.models.family import Family
from dashskip.models.layer import LayerParts, Norm


def layer_parts(layer: nn.Module, config: Any, window: int | None) -> LayerParts:
    attn, mlp = layer.self_attn, layer.mlp
    return LayerParts(
        q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj,
        gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj,
        attn_norm=Norm(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
        mlp_norm=Norm(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
        act=config.hidden_act,
        heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=attn.head_dim,
        scaling=attn.scaling, window=window,
    )  # fmt: skip


FAMILY = Family(
    model_types=("llama", "qwen2", "mistral"),
    layer_parts=layer_parts,
    mid_residual="post_attention_layernorm",
)
