"""Lossless mode on the real models, token-identical to full greedy decoding: SmolLM2 with 6 prompts x 48 tokens and
Gemma-3 with 3 x 32 in the default run, both with 20 prompts x 128 tokens in the slow one. Kernels are chosen by
rule (`kernels_by_rule`): the draft and the verification then round alike on every host with these kernels, and a
fresh cache does not spend a minute measuring kernel choices for Gemma-3's shapes (75 s of a fresh CI run)."""

import pytest
import torch

from dashskip.core.decisions import FixedStates
from dashskip.data import load_text, token_windows
from dashskip.runtime.generation import DraftLength, generate, generate_lossless, warp_logits
from tests.conftest import assert_greedy_agrees, chi2_critical, kernels_by_rule, within_reach

pytestmark = pytest.mark.real


@pytest.fixture(scope="module", autouse=True)
def pinned_kernels():
    with kernels_by_rule():
        yield


def drafter(dm):
    """SmolLM2: its shipped DASH policy at 1.5x. Gemma3 (loaded at 1.0, so without its policy): INT8 on every
    inner layer, a drafter that is rejected often enough to exercise the rollback."""
    if dm.policy is not None:
        return dm.decider_for(within_reach(dm, 1.5))
    n = dm.backbone.num_layers
    return FixedStates([4] + [2] * (n - 2) + [4])


SLOW = pytest.mark.slow
# The default run: SmolLM2 6 x 48 and Gemma-3 3 x 32 (~16 s); the slow set: 20 x 128 of each.
CASES = [("smollm2-135m", 6, 48), ("gemma3-270m", 3, 32),
         pytest.param("smollm2-135m", 20, 128, marks=SLOW), pytest.param("gemma3-270m", 20, 128, marks=SLOW)]


@pytest.mark.parametrize("name, count, tokens", CASES)
def test_lossless_is_token_identical_to_full_greedy(name, count, tokens, request):
    dm = request.getfixturevalue("smollm2" if name == "smollm2-135m" else "gemma3")
    prompts = token_windows(dm.tokenizer, load_text("wikitext2"), count, 24, seed=7)
    # Equal-length prompts, no padding: one batched full-greedy run is the reference for all of them.
    reference = generate(dm.engine, prompts, max_new_tokens=tokens).sequences
    draft = drafter(dm)
    drafted = accepted = 0
    for row in range(prompts.shape[0]):
        out, stats = generate_lossless(dm.engine, prompts[row : row + 1], draft, max_new_tokens=tokens)
        if not torch.equal(out.sequences[0], reference[row]):  # only a near tie may part them (the logits' shapes)
            logits = dm.backbone.logits(dm.engine.score(reference[row : row + 1]).hidden)[0]
            assert_greedy_agrees(out.sequences[0], reference[row], logits, f"prompt {row}")
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert drafted > 0 and accepted < drafted  # drafts were made, and some were really rejected


def test_an_int4_drafter_gives_the_full_models_greedy_tokens(smollm2):
    """Every inner layer in INT4 (group 64) drafts; the kept tokens are full greedy's."""
    n = smollm2.backbone.num_layers
    draft = FixedStates([4] + [1] * (n - 2) + [4])
    prompts = token_windows(smollm2.tokenizer, load_text("wikitext2"), 2, 24, seed=11)
    reference = generate(smollm2.engine, prompts, max_new_tokens=32).sequences
    rejected = 0
    for row in range(prompts.shape[0]):
        out, stats = generate_lossless(smollm2.engine, prompts[row : row + 1], draft, max_new_tokens=32)
        if not torch.equal(out.sequences[0], reference[row]):
            logits = smollm2.backbone.logits(smollm2.engine.score(reference[row : row + 1]).hidden)[0]
            assert_greedy_agrees(out.sequences[0], reference[row], logits, f"prompt {row}")
        rejected += stats.drafted - stats.accepted
    assert rejected > 0


def test_sampled_lossless_samples_the_full_models_distribution(smollm2):
    """Sampling end to end (temperature 1, top-p 0.95): the second new token, the first one drafted and verified,
    follows the full model's law given the first (chi-square at 0.1%, 100 draws: ~12 s). The drafter skips every
    inner layer, so its drafts are rejected and the kept token is drawn from the residual law: a draft kept as it
    came, or the law of another position, fails (the acceptance rule itself: test_lossless.py, 20000 draws)."""
    engine, n = smollm2.engine, smollm2.backbone.num_layers
    draft = FixedStates([4] + [0] * (n - 2) + [4])
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    gen = torch.Generator().manual_seed(0)
    pairs, drafted = [], 0
    for _ in range(100):
        out, stats = generate_lossless(engine, ids, draft, max_new_tokens=2, do_sample=True, temperature=1.0,
                                       top_p=0.95, generator=gen, length=DraftLength(1, adaptive=False))  # fmt: skip
        pairs.append(tuple(out.sequences[0, -2:].tolist()))
        drafted += stats.drafted
    first = max(set(p[0] for p in pairs), key=[p[0] for p in pairs].count)
    seconds = torch.tensor([p[1] for p in pairs if p[0] == first])
    assert len(seconds) >= 50 and drafted > 0
    logits = smollm2.backbone.logits(engine.score(torch.cat([ids, torch.tensor([[first]])], 1)).hidden)[0, -1]
    law = warp_logits(logits.float(), 1.0, 0.95).softmax(-1)
    assert int((law[seconds] == 0).sum()) == 0  # never a token top-p removed
    counts = torch.bincount(seconds, minlength=law.numel()).double()
    expected = law.double() * len(seconds)
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert int(keep.sum()) >= 2 and stat < chi2_critical(int(keep.sum()) - 1), (stat, int(keep.sum()))
