"""Quantization-only and static baselines: each hits its requested compute ratio from the measured cost table."""

import pytest
import torch

from dashskip import Backbone, Engine
from dashskip.core.costs import CostTable
from dashskip.errors import DashskipError
from dashskip.methods.quantized import QUANT_METHODS, Sensitivity, _mean_nll, layer_sensitivity, static_mixed
from tests.conftest import tiny_model

COSTS = CostTable(decode={0: 0.17, 1: 0.36, 2: 0.45, 4: 1.0}, prefill={0: 0.07, 1: 0.72, 2: 0.6, 4: 1.0})


def synthetic(n_inner: int = 28) -> Sensitivity:
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(n_inner, generator=gen)
    return Sensitivity(
        {2: (0.01 * base).tolist(), 1: (0.1 * base).tolist(), 0: (1.0 * base).tolist()}, "fp", "project", 0
    )


@pytest.mark.parametrize("method", list(QUANT_METHODS))
@pytest.mark.parametrize("speedup", [1.33, 1.67, 2.0])
def test_each_quantization_baseline_hits_its_ratio(method, speedup):
    sens = synthetic()
    decider = static_mixed(sens, COSTS, speedup, QUANT_METHODS[method])
    states = torch.tensor(decider.states)[None]
    assert abs(COSTS.compute_ratio(states) - speedup) <= 0.03 * speedup
    assert decider.states[0] == 4 and decider.states[-1] == 4
    assert set(decider.states[1:-1]) <= {4, *QUANT_METHODS[method]}


def test_least_sensitive_layers_are_quantized_first():
    sens = synthetic()
    decider = static_mixed(sens, COSTS, 1.33, QUANT_METHODS["int8"])
    chosen = [i for i, s in enumerate(decider.states) if s == 2]
    others = [i for i in range(1, 29) if i not in chosen]
    worst_chosen = max(sens.delta_nll[2][i - 1] for i in chosen)
    assert all(sens.delta_nll[2][i - 1] >= worst_chosen for i in others)


def test_unreachable_ratio_names_the_reachable_maximum():
    with pytest.raises(DashskipError, match=r"reaches compute ratios up to 2\.\d+.*3\.0 is out of reach"):
        static_mixed(synthetic(), COSTS, 3.0, QUANT_METHODS["int8"])


def test_layer_sensitivity_is_the_nll_change_of_one_layer_alone():
    from dashskip.core.decisions import FixedStates

    engine = Engine(Backbone(tiny_model("llama")))
    windows = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    sens = layer_sensitivity(engine, windows, "fp", progress=False)
    assert {k: len(v) for k, v in sens.delta_nll.items()} == {0: 4, 1: 4, 2: 4}
    by_hand = _mean_nll(engine, windows, FixedStates([4, 4, 4, 0, 4, 4])) - _mean_nll(engine, windows, None)
    assert sens.delta_nll[0][2] == pytest.approx(by_hand, abs=1e-6)
    assert sum(map(abs, sens.delta_nll[0])) > sum(map(abs, sens.delta_nll[2]))  # skipping hurts more than INT8
