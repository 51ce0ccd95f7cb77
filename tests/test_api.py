"""The Python API as code written for transformers calls it: `model(input_ids).logits`, a cache to continue
from, and what dashskip ran (states, compute ratio) on the same output object."""

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from dashskip import DashModel, FixedStates, TokenStates
from dashskip.errors import DashskipError
from tests.conftest import tiny_model


def test_forward_returns_transformers_output_with_the_models_logits(family):
    model = tiny_model(family)
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    dm = DashModel(model)
    out = dm(ids)
    assert isinstance(out, CausalLMOutputWithPast)
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    assert out.states.shape == (2, 10, 6) and out.compute_ratio == pytest.approx(1.0)
    # continuing from the returned cache gives the logits of the whole sequence
    first = dm(ids[:, :7])
    rest = dm(ids[:, 7:], past_key_values=first.past_key_values)
    torch.testing.assert_close(rest.logits, want[:, 7:], rtol=1e-5, atol=1e-5)
    assert dm.forward is not None and dm(ids, use_cache=False).past_key_values is None


def test_forward_gives_every_token_its_own_states():
    model = tiny_model("llama")
    dm = DashModel(model)
    pattern = TokenStates(lambda layer, pos: torch.where(pos % 2 == 0, 4, 2) if layer in (2, 3) else pos * 0 + 4)
    out = dm(torch.randint(3, 97, (1, 6)), decider=pattern)
    assert out.states[0, ::2, 2].eq(4).all() and out.states[0, 1::2, 2].eq(2).all()
    costs = dm.costs.decode  # layers 2 and 3 in INT8 at odd positions, every other token-layer in full
    per_token = [4 * costs[4] + 2 * (costs[4] if p % 2 == 0 else costs[2]) for p in range(6)]
    assert out.compute_ratio == pytest.approx(6 / (sum(per_token) / 6), rel=1e-6)
    fixed = dm(torch.randint(3, 97, (1, 4)), decider=FixedStates([4, 0, 4, 4, 4, 4]))
    assert fixed.states[0, :, 1].eq(0).all()


def test_forward_refuses_what_it_cannot_run():
    dm = DashModel(tiny_model("llama"))
    with pytest.raises(DashskipError, match=r"\(batch, tokens\)"):
        dm(torch.tensor([1, 2, 3]))
    with pytest.raises(DashskipError, match="past_key_values must be the Session"):
        dm(torch.tensor([[1, 2]]), past_key_values=object())
