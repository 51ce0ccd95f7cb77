"""Gemma-3 (text): q/k norms before rope, every sublayer's output normed before the residual add, norms that
scale by `1 + w`, a GELU-gated MLP, local (sliding-window) and global layers with a rope each, and embeddings
scaled by sqrt(hidden) (the embedding module does that)."""

from __future__ import annotations

from typing import Any

from torch import nn

from dashskip.errors import DashskipError
from dashskip.models.family import Family
from dashskip.models.layer import LayerParts, Norm


def gemma_norm(module: nn.Module) -> Norm:
    """Gemma's RMS norm multiplies by `1 + weight` (the weight is stored as an offset from one)."""
    return Norm((1.0 + module.weight.detach().float()).contiguous(), module.eps)


def layer_parts(layer: nn.Module, config: Any, window: int | None) -> LayerParts:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise DashskipError("Gemma models with attention logit soft-capping (Gemma 2) are not supported")
    attn, mlp = layer.self_attn, layer.mlp
    return LayerParts(
        q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj,
        gate=mlp.gate_proj, up=mlp.up_proj, down=mlp.down_proj,
        attn_norm=gemma_norm(layer.input_layernorm), mlp_norm=gemma_norm(layer.pre_feedforward_layernorm),
        q_norm=gemma_norm(attn.q_norm), k_norm=gemma_norm(attn.k_norm),
        post_attn_norm=gemma_norm(layer.post_attention_layernorm),
        post_mlp_norm=gemma_norm(layer.post_feedforward_layernorm),
        act=config.hidden_activation,
        heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=attn.head_dim,
        scaling=attn.scaling, window=window,
    )  # fmt: skip


FAMILY = Family(
    model_types=("gemma3_text",),
    layer_parts=layer_parts,
    mid_residual="pre_feedforward_layernorm",
)
