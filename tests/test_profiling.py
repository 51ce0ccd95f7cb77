import pytest
import torch

from dashskip import Backbone, Engine
from dashskip.core.costs import CostTable
from dashskip.errors import DashskipError
from dashskip.measure.profiling import profile, state_errors


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
