"""The flat Llama-family layer and its compiled ops: equal to the transformers layer (and to torch's own ops) up
to float rounding, in every state, for decode, verification-sized and prefill steps, compiled or not."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from dashskip import Backbone, kernels
from dashskip.cache import KVCache
from dashskip.engine import build_mask
from dashskip.states import State
from tests.conftest import tiny_model

FLAT_FAMILIES = ["llama", "qwen2", "mistral"]  # qwen2's q/k/v have biases: the fused bias is exercised too
# fp32 agrees to rounding; the quantized states round activations to bf16 in torch's kernels (and, for INT8,
# not in dashskip's), where one rounding step is ~4e-3 relative.
TOLERANCE = {State.FULL: 1e-5, State.INT8: 2e-2, State.INT4: 2e-2}


@pytest.fixture(scope="module")
def ops():
    if kernels._cpu_supports() is not None:
        pytest.skip(f"kernels not for this CPU: {kernels._cpu_supports()}")
    return kernels.extension()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def filled_cache(bb: Backbone, prefix: int) -> KVCache:
    cfg = bb.config
    cache = KVCache(bb.num_layers, 1, cfg.num_key_value_heads, cfg.head_dim, torch.float32, torch.device("cpu"), 64)
    gen = torch.Generator().manual_seed(5)
    for store in (cache.keys, cache.values):
        for t in store:
            t[:, :, :prefix] = torch.randn(t[:, :, :prefix].shape, generator=gen)
    cache.length = prefix
    return cache


@pytest.mark.parametrize("family", FLAT_FAMILIES)
@pytest.mark.parametrize("state", [State.FULL, State.INT8, State.INT4])
@pytest.mark.parametrize("prefix, tokens", [(9, 1), (9, 5), (0, 7), (3, 20)])
@pytest.mark.parametrize("compiled", [True, False])
def test_flat_layer_equals_the_transformers_layer(ops, family, state, prefix, tokens, compiled):
    """Same output and same K/V in the cache as the transformers layer with the same weights and state."""
    bb = Backbone(tiny_model(family))
    assert bb.flat is not None
    x = torch.randn(1, tokens, bb.config.hidden_size, generator=torch.Generator().manual_seed(tokens)) * 2
    positions = torch.arange(prefix, prefix + tokens)[None]
    rope = bb.rope(x, positions)["full_attention"]
    theirs, ours = filled_cache(bb, prefix), filled_cache(bb, prefix)
    for cache in (theirs, ours):
        cache.begin_step(tokens)
    mask = build_mask(None, prefix, prefix + tokens, None, 1, "sdpa")
    for i in (1, 4):
        bb.rows.set_uniform(int(state))
        try:
            want = bb.layers[i](x, attention_mask=mask, position_embeddings=rope, position_ids=positions, cache=theirs)
        finally:
            bb.rows.set_uniform(int(State.FULL))
        got = bb.flat[i](int(state), x, rope, mask, ours, compiled)
        assert rel_err(got, want) < TOLERANCE[state]
        end = prefix + tokens
        for a, b in ((ours.keys[i], theirs.keys[i]), (ours.values[i], theirs.values[i])):
            assert rel_err(a[:, :, :end], b[:, :, :end]) < TOLERANCE[state]


def test_only_the_llama_family_gets_flat_layers():
    assert Backbone(tiny_model("gemma3_text")).flat is None
    assert len(Backbone(tiny_model("mistral")).flat) == 6


@pytest.mark.parametrize("state", [State.FULL, State.INT8, State.INT4])
def test_fused_linear_gives_its_parts_outputs_side_by_side(state):
    bb = Backbone(tiny_model("qwen2"))
    layer = bb.flat[2]
    for fused in (layer.qkv, layer.gate_up):
        for rows in (1, 3, 70):  # 70: past every kernel's range, each part's own path
            x = torch.randn(1, rows, bb.config.hidden_size)
            want = torch.cat([p.run(int(state), x) for p in fused.parts], dim=-1)
            torch.testing.assert_close(fused(int(state), x), want, rtol=1e-5, atol=1e-5)


def test_fused_int8_weight_shares_the_parts_storage():
    bb = Backbone(tiny_model("llama"))
    fused = bb.flat[1].qkv
    weight, _ = fused.packed(int(State.INT8))
    base = weight.untyped_storage().data_ptr()
    assert all(p.int8_weight.untyped_storage().data_ptr() == base for p in fused.parts)
    assert sum(p.int8_weight.shape[0] for p in fused.parts) == weight.shape[0]


@pytest.mark.parametrize("rows", [1, 5])
def test_compiled_rms_norm_equals_torch(ops, rows):
    x, weight = torch.randn(1, rows, 576) * 3, torch.randn(576)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5))


@pytest.mark.parametrize("start, tokens", [(0, 1), (0, 6), (11, 1), (11, 5)])
def test_compiled_attention_equals_sdpa_with_the_causal_mask(ops, start, tokens):
    """Query t at position start + t sees keys 0..start + t; 6 query heads share 2 key/value heads."""
    gen = torch.Generator().manual_seed(start + tokens)
    q = torch.randn(1, 6, tokens, 16, generator=gen)
    keys, values = (torch.randn(1, 2, 32, 16, generator=gen) for _ in range(2))
    end = start + tokens
    allowed = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    want = F.scaled_dot_product_attention(
        q, keys[:, :, :end], values[:, :, :end], attn_mask=allowed, scale=0.3, enable_gqa=True
    )
    got = ops.causal_attention(q, keys, values, start, 0.3)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(1, tokens, 6 * 16), rtol=1e-5, atol=1e-5)


def test_compiled_rope_and_cache_write_rotate_like_transformers(ops):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    heads, kv, dh, tokens, start = 4, 2, 16, 3, 5
    qkv = torch.randn(1, tokens, (heads + 2 * kv) * dh)
    angle = torch.randn(1, tokens, dh // 2).repeat(1, 1, 2)
    cos, sin = angle.cos(), angle.sin()
    keys, values = torch.zeros(1, kv, 16, dh), torch.zeros(1, kv, 16, dh)
    q = ops.rope_and_cache(qkv, cos, sin, keys, values, heads, start)
    split = qkv.view(1, tokens, heads + 2 * kv, dh).transpose(1, 2)
    want_q, want_k = apply_rotary_pos_emb(split[:, :heads], split[:, heads : heads + kv], cos, sin)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(keys[:, :, start : start + tokens], want_k)
    torch.testing.assert_close(values[:, :, start : start + tokens], split[:, heads + kv :])
    assert not keys[:, :, :start].any() and not keys[:, :, start + tokens :].any()


@pytest.mark.parametrize("family", FLAT_FAMILIES)
@pytest.mark.parametrize("tokens", [1, 5, 20])  # 20: past the compiled ops' range, torch's ops
def test_skipped_tokens_kv_equals_the_layers_own_projection(ops, family, tokens):
    bb = Backbone(tiny_model(family))
    x = torch.randn(1, tokens, bb.config.hidden_size) * 2
    rope = bb.rope(x, torch.arange(4, 4 + tokens)[None])["full_attention"]
    cache = filled_cache(bb, 4)
    cache.begin_step(tokens)
    bb.flat[3].write_skipped_kv(x, rope, cache)
    key, value = bb.project_kv(3, x, rope)
    torch.testing.assert_close(cache.keys[3][:, :, 4 : 4 + tokens], key, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.values[3][:, :, 4 : 4 + tokens], value, rtol=1e-5, atol=1e-5)
