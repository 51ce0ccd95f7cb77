import time

import pytest
import torch

from dashskip import Backbone, Engine
from dashskip.core.costs import CostTable
from dashskip.core.decisions import Decider
from dashskip.errors import DashskipError
from dashskip.measure.profiling import measure_beyond_layers, profile, state_errors


def test_compute_ratio_by_hand():
    table = CostTable(decode={0: 0.0, 1: 0.4, 2: 0.5, 4: 1.0}, prefill={0: 0.0, 1: 0.4, 2: 0.5, 4: 1.0})
    # 4 layers: full, skip, int8, full -> cost 2.5 -> ratio 1.6; second token all full -> 1.0; mean cost 3.25
    states = torch.tensor([[4, 0, 2, 4], [4, 4, 4, 4]])
    assert table.compute_ratio(states[:1]) == pytest.approx(4 / 2.5)
    assert table.compute_ratio(states) == pytest.approx(4 / 3.25)


def test_profile_measures_every_state_and_round_trips(tmp_path, model):
    eng = Engine(Backbone(model))
    table = profile(eng, "fp", context=8, prefill_tokens=16, repeats=2, layers=[1, 2], progress=False)
    assert table.measured and table.decode[4] == 1.0 and table.prefill[4] == 1.0
    for mode in ("decode", "prefill"):
        assert set(getattr(table, mode)) == {0, 1, 2, 4}
        assert all(len(v) == 2 and min(v) > 0 for v in table.layer_ms[mode].values())
    table.save(tmp_path / "p.json")
    assert CostTable.load(tmp_path / "p.json", "fp").decode == table.decode
    with pytest.raises(DashskipError, match="another model"):
        CostTable.load(tmp_path / "p.json", "other")
    with pytest.raises(DashskipError, match="layer indices"):
        profile(eng, "fp", layers=[99], progress=False)


def test_state_errors_on_real_hidden_states(model):
    n = model.config.num_hidden_layers
    eng = Engine(Backbone(model), scales=torch.full((n,), 1.1))
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    errors = state_errors(eng, ids)
    for kind in ("output", "update"):
        assert set(errors[kind]) == {"0", "1", "2"}
        assert all(len(v) == n - 2 for v in errors[kind].values())
    # int8 is far closer to full than int4, and both far closer than skipping
    for i in range(n - 2):
        assert 0 < errors["output"]["2"][i] < errors["output"]["1"][i] < errors["output"]["0"][i]


def test_cost_tables_and_kernel_choices_are_kept_apart_per_activation_arithmetic(monkeypatch):
    from dashskip.measure.profiling import default_profile_path

    monkeypatch.setenv("DASHSKIP_ACTIVATIONS", "int8")
    int8 = default_profile_path("fp", "project")
    monkeypatch.setenv("DASHSKIP_ACTIVATIONS", "bf16")
    assert default_profile_path("fp", "project") != int8 and int8.name.endswith("-int8.json")


def test_a_speedup_counts_what_a_token_costs_beyond_its_layers():
    """Predicted wall clock = (L + outside) / (layer costs + outside + decisions), against the full path with the
    same head; the compute ratio that delivers a speedup inverts it; without those costs a speedup is a ratio."""
    costs = {0: 0.1, 1: 0.3, 2: 0.4, 4: 1.0}
    table = CostTable(costs, costs, True, outside={"full": 6.0, "int8": 1.5}, decisions={"dash": 2.0})
    states = torch.tensor([[4, 0, 2, 2, 0, 4]])  # 6 layers costing 3.0
    assert table.compute_ratio(states) == pytest.approx(2.0)
    assert table.speedup(states) == pytest.approx(12 / 9)  # the full head's 6 layers' worth is paid either way
    assert table.speedup(states, "full", "dash") == pytest.approx(12 / 11)
    assert table.speedup(states, "int8", "dash") == pytest.approx(7.5 / 6.5)
    for head in ("full", "int8"):
        ratio = table.compute_target(1.2, 6, head, "dash")
        assert table.speedup_at(ratio, 6, head, "dash") == pytest.approx(1.2)
    with pytest.raises(DashskipError, match="out of reach on this machine.*at most 1.50x"):
        table.compute_target(2.0, 6, "full", "dash")  # even skipping everything: 12 / (6 + 2)
    bare = CostTable(costs, costs)  # not measured: a speedup is a compute ratio
    assert not bare.wall_clock("full", None) and not table.wall_clock("bf16", None)
    assert not table.wall_clock("full", "another-policy") and table.wall_clock("int8", "dash")
    assert bare.speedup(states) == pytest.approx(2.0) and bare.compute_target(1.7, 6) == pytest.approx(1.7)


class SlowDecider(Decider):
    """Answers full after a known wait: its time must be booked as deciding, not as the step's other work."""

    def __call__(self, layer, hidden, previous):
        time.sleep(0.01)
        return 4


def test_profile_measures_the_cost_beyond_the_layers_and_a_deciders_own(tmp_path, model):
    eng = Engine(Backbone(model))
    table = profile(eng, "fp", context=8, prefill_tokens=16, repeats=2, layers=[1, 2], progress=False)
    assert set(table.outside) == {"full"} and table.outside["full"] >= 0 and not table.decisions
    measure_beyond_layers(eng, table, "int8", SlowDecider(), "slow", context=8, steps=3)
    assert set(table.outside) == {"full", "int8"} and table.wall_clock("int8", "slow")
    assert table.decisions["slow"] > table.outside["int8"]  # 10 ms per layer decided, far more than the head
    table.save(tmp_path / "p.json")
    again = CostTable.load(tmp_path / "p.json", "fp")
    assert again.outside == table.outside and again.decisions == table.decisions
