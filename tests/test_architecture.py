"""The architecture's promises: packages import only the layers below them, and a state added through the
registry runs everywhere a built-in one does (engine, mixed rows, policy, profiling, generation statistics)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dashskip import Backbone, Engine
from dashskip.core.costs import CostTable
from dashskip.core.decisions import TokenStates, inner_layers
from dashskip.core.handlers import BF16WeightOnly
from dashskip.core.states import StateSpec, register, registered, unregister
from dashskip.errors import DashskipError
from dashskip.measure.profiling import profile
from dashskip.methods.dash.policy import PolicyConfig, PolicyDecider, ScoringModel
from dashskip.runtime.generation import generate
from tests.conftest import tiny_model

SRC = Path(__file__).resolve().parents[1] / "src" / "dashskip"
# Lowest first; a package may import its own modules and those of packages before it.
LAYERS = ["errors", "data", "core", "models", "runtime", "measure", "methods", "api", "eval", "serve", "vllm", "cli"]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dashskip":
            found |= {node.module + "." + a.name for a in node.names} if node.module == "dashskip" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dashskip"}
    return found


def test_packages_import_only_the_layers_below_them():
    wrong = []
    for path in SRC.rglob("*.py"):
        own = _package(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        if own == "__init__":
            continue  # the top-level package re-exports the public API
        for target in _imports(path):
            other = _package(target)
            if other != own and LAYERS.index(other) > LAYERS.index(own):
                wrong.append(f"{path.relative_to(SRC)} imports {target}")
    assert not wrong, "imports against the data flow (docs/architecture.md):\n" + "\n".join(sorted(wrong))


BF16 = 3  # a free code


@pytest.fixture
def bf16_state():
    """A toy bf16-weights state, registered as a contributor would add one (bits chosen to sit between int8 and
    full so its level is distinct)."""
    register(StateSpec(BF16, "bf16", 12, 0.7, BF16WeightOnly()))
    yield BF16
    unregister(BF16)


def test_a_registered_state_runs_in_the_engine_uniform_and_mixed(bf16_state):
    model = tiny_model("llama")
    engine = Engine(Backbone(model))
    bb = engine.backbone
    ids = torch.randint(3, 97, (2, 9))
    full = bb.logits(engine.step(ids, engine.new_session(2)).hidden)
    uniform = engine.step(ids, engine.new_session(2), inner_layers(bb.num_layers, "bf16"))
    assert uniform.states[..., 1:-1].eq(bf16_state).all()
    # bf16 weights and activations: close to full precision, not equal to it
    got = bb.logits(uniform.hidden)
    assert 0 < (got - full).abs().max() < 0.05 * full.abs().max()

    def mixed(layer, positions):  # row 0 in bf16, row 1 in full, a few skipped tokens in row 1
        states = torch.full(positions.shape, bf16_state)
        states[1] = 4
        states[1, ::3] = 0
        return states

    both = engine.step(ids, engine.new_session(2), TokenStates(mixed))
    assert set(both.states[..., 1:-1].unique().tolist()) == {0, bf16_state, 4}
    assert torch.allclose(both.hidden[0], uniform.hidden[0], atol=1e-5)


def test_a_registered_state_is_chosen_by_a_policy_profiled_and_counted(bf16_state):
    model = tiny_model("llama")
    engine = Engine(Backbone(model))
    names = tuple(s.name for s in registered())
    assert names == ("skip", "int4", "int8", "bf16", "full")
    config = PolicyConfig(64, engine.backbone.num_layers, states=names, allowed=("bf16", "full"))
    torch.manual_seed(0)
    scorer = ScoringModel(config)
    assert scorer(torch.randn(1, 2, 64), 1, 2, torch.full((1, 2), 4)).shape == (1, 2, 5)
    costs = torch.tensor([0.0, 0.4, 0.5, 0.7, 1.0])
    decider = PolicyDecider(scorer, torch.ones(engine.backbone.num_layers), costs, bias=100.0)  # cost dominates
    result = engine.step(torch.randint(3, 97, (1, 8)), engine.new_session(1), decider)
    assert result.states[..., 1:-1].eq(bf16_state).all()  # the cheapest allowed state

    table = profile(engine, "fp", context=8, prefill_tokens=8, repeats=1, layers=[1], progress=False)
    assert set(table.decode) == {0, 1, 2, bf16_state, 4} and table.decode[bf16_state] > 0

    out = generate(engine, torch.randint(3, 97, (1, 5)), decider=inner_layers(6, "bf16"), max_new_tokens=3,
                   costs=CostTable.default())  # fmt: skip
    assert out.stats()["state_fractions"]["bf16"] > 0.5


def test_state_codes_and_names_cannot_be_taken_twice(bf16_state):
    with pytest.raises(DashskipError, match="taken"):
        register(StateSpec(bf16_state, "other", 8, 0.5, BF16WeightOnly()))
    with pytest.raises(DashskipError, match="registered already"):
        register(StateSpec(5, "bf16", 12, 0.7, BF16WeightOnly()))
    with pytest.raises(DashskipError, match="built in"):
        unregister(4)
