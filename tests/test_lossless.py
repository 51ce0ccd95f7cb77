"""Lossless mode: drafts by a cheap path, verification by the full model, exact output and correct K/V."""

import pytest
import torch

from dashskip import Backbone, Engine, FixedStates, TokenStates
from dashskip.errors import DashskipError
from dashskip.runtime.generation import DraftLength, generate, generate_lossless, warp_logits
from tests.conftest import chi2_critical, tiny_model

# A draft path that disagrees often with the full model (layers 1-4 skipped), and one per token.
SKIP_MOST = FixedStates([4, 0, 0, 0, 0, 4])


def per_token():
    return TokenStates(
        lambda layer, positions: torch.where(positions % 3 == 0, 0, 2) if 0 < layer < 5 else positions * 0 + 4
    )


@pytest.mark.parametrize("draft", ["skip-most", "per-token", "copy-rule"])
def test_greedy_lossless_is_token_identical_to_full_greedy(family, draft):
    model = tiny_model(family)
    engine = Engine(Backbone(model), scales=torch.linspace(0.9, 1.1, 6))
    decider = per_token() if draft == "per-token" else SKIP_MOST
    drafter = Engine(engine.backbone, engine.scales, "copy") if draft == "copy-rule" else None
    gen = torch.Generator().manual_seed(4)
    rejected = 0
    for _ in range(4):
        ids = torch.randint(3, 97, (1, int(torch.randint(3, 12, (1,), generator=gen))), generator=gen)
        reference = generate(engine, ids, max_new_tokens=30).sequences
        for adaptive in (True, False):
            out, stats = generate_lossless(
                engine, ids, decider, max_new_tokens=30, length=DraftLength(5, adaptive), draft_engine=drafter
            )
            assert torch.equal(out.sequences, reference)
            rejected += stats.drafted - stats.accepted
    assert rejected > 0  # the drafts were really checked, not all accepted


def test_rollback_leaves_the_cache_as_a_full_run_would():
    """After a round that rejects drafts, K/V of every kept position equal a full run's; later tokens see those."""
    model = tiny_model("llama")
    engine = Engine(Backbone(model))
    ids = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    session = engine.new_session(1, 32)
    engine.step(ids, session)
    start = session.cache.length
    drafts = [5, 6, 7]
    for token in drafts:  # partial K/V from a skipping draft path
        engine.step(torch.tensor([[token]]), session, SKIP_MOST)
    session.cache.length = start
    engine.step(torch.tensor([[9, *drafts]]), session)  # verify: full K/V over the drafts
    session.cache.length = start + 2  # keep 9 and the first draft; roll back the rest
    after = engine.step(torch.tensor([[11]]), session).hidden
    reference_session = engine.new_session(1, 32)
    reference = engine.step(torch.cat([ids, torch.tensor([[9, 5, 11]])], dim=1), reference_session).hidden
    assert torch.allclose(after[0, -1], reference[0, -1], atol=1e-5)
    for layer in range(6):
        kept = start + 2
        assert torch.allclose(
            session.cache.keys[layer][..., :kept, :], reference_session.cache.keys[layer][..., :kept, :], atol=1e-5
        )


def test_speculative_acceptance_samples_the_full_models_distribution():
    """Chi-square: draft ~ q, accept with min(1, p/q), else resample from max(0, p - q): the kept token ~ p.

    p and q are the tiny model's full and draft-path next-token laws (temperature 1.3, top-p 0.95)."""
    from dashskip.runtime.generation import _accept

    engine = Engine(Backbone(tiny_model("llama", seed=3)))
    ids = torch.tensor([[5, 17, 33, 2, 41]])

    def law(decider):
        logits = engine.backbone.logits(engine.step(ids, engine.new_session(1), decider).hidden[0, -1]).float()
        return warp_logits(logits, 1.3, 0.95).softmax(-1)

    p, q = law(None), law(SKIP_MOST)
    gen = torch.Generator().manual_seed(0)
    draws, counts, accepted = 20000, torch.zeros_like(p), 0
    for _ in range(draws):
        draft = int(torch.multinomial(q, 1, generator=gen))
        n, token = _accept([draft], [q], torch.stack([p, p]), gen, sample=True)
        counts[draft if n == 1 else token] += 1
        accepted += n
    assert 0.05 < accepted / draws < 0.95  # both acceptance and residual sampling were exercised
    expected = p * draws
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert stat < chi2_critical(int(keep.sum()) - 1)
    assert int(counts[p == 0].sum()) == 0  # never a token top-p removed


def test_sampled_lossless_generation_runs_and_is_reproducible():
    engine = Engine(Backbone(tiny_model("llama")))
    ids = torch.tensor([[5, 17, 33]])

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        out, stats = generate_lossless(
            engine, ids, SKIP_MOST, max_new_tokens=20, do_sample=True, temperature=0.8, generator=gen
        )
        assert stats.rounds >= 1
        return out.sequences

    assert torch.equal(run(1), run(1)) and run(1).shape == (1, 23)


def test_lossless_refuses_batches_and_needs_a_draft_path():
    model = tiny_model("llama")
    engine = Engine(Backbone(model))
    with pytest.raises(DashskipError, match="one sequence at a time"):
        generate_lossless(engine, torch.ones(2, 3, dtype=torch.long), SKIP_MOST)
    with pytest.raises(DashskipError, match="k must be >= 1"):
        DraftLength(0)
    from dashskip.api import DashModel

    with pytest.raises(DashskipError, match="set a speedup > 1"):
        DashModel(model).generate(torch.ones(1, 3, dtype=torch.long), lossless=True, draft="dash")


@pytest.mark.parametrize("draft", ["int8", "int4"])
def test_quantized_drafters_need_no_policy_and_keep_the_full_output(draft):
    from dashskip.api import DashModel

    model = tiny_model("llama")
    dm = DashModel(model)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    full = dm.generate(ids, max_new_tokens=20, eos_token_id=None)
    out = dm.generate(ids, max_new_tokens=20, eos_token_id=None, lossless=True, draft=draft, adaptive_draft=False)
    assert torch.equal(out, full)
    assert dm.last_speculative.drafted > 0
    with pytest.raises(DashskipError, match="unknown drafter 'int2'"):
        dm.generate(ids, lossless=True, draft="int2")


def test_a_lossless_output_carries_its_drafting_statistics():
    """What the drafting achieved comes back in the output itself (and in its stats, as the server and the CLI
    report it), not only in the model's `last_speculative`, which the next call overwrites."""
    from dashskip.api import DashModel

    dm = DashModel(tiny_model("llama"))
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    out = dm.generate(ids, max_new_tokens=12, eos_token_id=None, lossless=True, draft="int8",
                      return_dict_in_generate=True)  # fmt: skip
    assert out.speculative is dm.last_speculative and out.speculative.drafted > 0
    assert out.stats()["lossless"] == out.speculative.as_dict()
    plain = dm.generate(ids, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True)
    assert plain.speculative is None and "lossless" not in plain.stats()
