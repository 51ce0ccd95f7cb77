"""Lossless mode on the real models, token-identical to full greedy decoding: SmolLM2 with 6 prompts x 48 tokens in
the default run; both models with 20 prompts x 128 tokens, and Gemma-3 with 3 x 32, in the slow one (Gemma-3's
case spent 75 s of a fresh CI run, most of it measuring kernel choices for its shapes; the speculative loop is the
same code for every family, and Gemma-3's full path is checked token for token in test_real_models.py)."""

import pytest
import torch

import dashskip
from dashskip.core.decisions import FixedStates
from dashskip.data import load_text, token_windows
from dashskip.runtime.generation import generate, generate_lossless

pytestmark = pytest.mark.real


def drafter(dm):
    """SmolLM2: its shipped DASH policy at 1.5x. Gemma3 (loaded at 1.0, so without its policy): INT8 on every
    inner layer, a drafter that is rejected often enough to exercise the rollback."""
    if dm.policy is not None:
        return dm.decider_for(1.5)
    n = dm.backbone.num_layers
    return FixedStates([4] + [2] * (n - 2) + [4])


SLOW = pytest.mark.slow
# The default run: SmolLM2 6 x 48 and Gemma-3 3 x 32 (~16 s); the slow set: 20 x 128 of each.
CASES = [("smollm2-135m", 1.5, 6, 48), ("gemma3-270m", 1.0, 3, 32),
         pytest.param("smollm2-135m", 1.5, 20, 128, marks=SLOW), pytest.param("gemma3-270m", 1.0, 20, 128, marks=SLOW)]


@pytest.mark.parametrize("name, speedup, count, tokens", CASES)
def test_lossless_is_token_identical_to_full_greedy(name, speedup, count, tokens):
    dm = dashskip.from_pretrained(name, speedup=speedup)
    prompts = token_windows(dm.tokenizer, load_text("wikitext2"), count, 24, seed=7)
    # Equal-length prompts, no padding: one batched full-greedy run is the reference for all of them.
    reference = generate(dm.engine, prompts, max_new_tokens=tokens).sequences
    draft = drafter(dm)
    drafted = accepted = 0
    for row in range(prompts.shape[0]):
        out, stats = generate_lossless(dm.engine, prompts[row : row + 1], draft, max_new_tokens=tokens)
        assert torch.equal(out.sequences[0], reference[row]), f"prompt {row} diverged"
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert drafted > 0 and accepted < drafted  # drafts were made, and some were really rejected
