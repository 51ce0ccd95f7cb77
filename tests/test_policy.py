import pytest
import torch

from dashskip import Backbone, Engine
from dashskip.api import DashModel
from dashskip.errors import DashskipError
from dashskip.methods.dash.policy import DashPolicy, PolicyConfig, PolicyDecider, ScoringModel
from tests.conftest import make_policy, tiny_model, within_reach

STATE_VALUES = torch.tensor([0, 1, 2, 4])  # the built-in states' codes, which are also their levels


def test_scores_have_one_output_per_state_and_penalise_change():
    policy = make_policy()
    h = torch.randn(2, 3, 64)
    base = policy.model(h, 1, 2, torch.full((2, 3), 4))
    assert base.shape == (2, 3, 4)
    alpha = policy.config.change_penalty
    from_skip = policy.model(h, 1, 2, torch.zeros(2, 3, dtype=torch.long))
    # moving from state 0 instead of 4: the penalty |s - s_i| changes by (|s - 0| - |s - 4|) * alpha
    delta = (STATE_VALUES.float() - 0).abs() - (STATE_VALUES.float() - 4).abs()
    assert torch.allclose(base - from_skip, alpha * delta.expand_as(base), atol=1e-5)


def test_async_decides_next_layer_from_scaled_input_and_sync_from_real_input():
    policy = make_policy()
    scales = torch.linspace(0.5, 1.5, 6)
    costs = torch.tensor([0.0, 0.4, 0.5, 1.0])
    h = [torch.randn(1, 4, 64) for _ in range(6)]
    asyn = PolicyDecider(policy.model, scales, costs, mode="async", record=True)
    asyn.begin(None)
    first = asyn(0, h[0], 4)
    assert first == 4
    rec = asyn.records[0]
    assert rec.current == 0 and rec.nxt == 1 and torch.equal(rec.hidden, h[0] * scales[0])
    assert torch.equal(asyn(1, h[1], first), STATE_VALUES[rec.index])  # layer 1 gets what was decided at layer 0
    syn = PolicyDecider(policy.model, scales, costs, mode="sync", record=True)
    syn.begin(None)
    assert syn(0, h[0], 4) == 4 and not syn.records
    syn(2, h[2], torch.full((1, 4), 2))
    assert syn.records[0].current == 1 and syn.records[0].nxt == 2 and torch.equal(syn.records[0].hidden, h[2])


@pytest.mark.parametrize("sizes", [(256, 64), (96, 20)])  # the defaults; widths that are not multiples of 64
@pytest.mark.parametrize("shape", [(3, 7), (2, 5), (1, 1)])  # torch's ops; the compiled call (few rows; one)
def test_folded_greedy_scorer_chooses_what_the_scoring_model_chooses(shape, sizes):
    from dashskip.methods.dash.policy import GreedyScorer

    torch.manual_seed(0)
    model = ScoringModel(PolicyConfig(64, 6, hidden1=sizes[0], hidden2=sizes[1], full_prior=0.0))
    costs = torch.tensor([0.1, 0.4, 0.5, 1.0])
    cost_bias = 0.3 * costs
    scorer = GreedyScorer(model, costs)
    table = scorer.table(0.3)
    gen = torch.Generator().manual_seed(1)
    chosen = []
    for current in range(5):
        for _ in range(10):
            h = torch.randn(*shape, 64, generator=gen) * 4
            for previous in (STATE_VALUES[torch.randint(0, 4, shape, generator=gen)], 2):
                prev = previous if isinstance(previous, torch.Tensor) else torch.full(shape, previous)
                with torch.no_grad():
                    reference = STATE_VALUES[(model(h, current, current + 1, prev) - cost_bias).argmax(-1)]
                answer = scorer(h, current, previous, table)
                if h.numel() == 64:  # one row: a plain int keeps the engine on its uniform fast path
                    assert isinstance(answer, int) and answer == int(reference)
                else:
                    assert torch.equal(answer, reference)
                chosen += reference.reshape(-1).tolist()
    assert len(set(chosen)) >= 3  # the comparison saw several states


def test_states_left_out_of_a_policy_are_never_chosen():
    model = ScoringModel(PolicyConfig(64, 6, allowed=(0, 2, 4), full_prior=-5.0)).requires_grad_(False)
    h = torch.randn(4, 9, 64) * 3
    scores = model(h, 1, 2, torch.full((4, 9), 4))
    assert not scores.argmax(-1).eq(1).any()  # index 1 = INT4
    probs = torch.softmax(scores, -1)
    assert float(probs[..., 1].max()) == 0.0
    from dashskip.methods.dash.policy import GreedyScorer

    scorer = GreedyScorer(model, torch.ones(4))
    assert not scorer(h, 1, 4, scorer.table(0.0)).eq(1).any()
    with pytest.raises(DashskipError, match="include full"):
        PolicyConfig(64, 6, allowed=(0, 2))


def test_greedy_policy_gives_per_token_states_in_the_engine():
    model = tiny_model("llama")
    policy = make_policy()
    engine = Engine(Backbone(model), scales=policy.scales())
    for bias in (0.0, 10.0):
        decider = PolicyDecider(policy.model, policy.scales(), policy.costs(), bias)
        result = engine.step(torch.randint(3, 97, (2, 9)), engine.new_session(2), decider)
        assert result.states[..., 0].eq(4).all() and result.states[..., -1].eq(4).all()
    assert result.states[..., 1:-1].float().mean() < 4  # a strong cost bias moves tokens off the full state


def test_bias_interpolates_and_refuses_unreachable_speedups():
    policy = make_policy()
    assert policy.bias_for(1.5) == 0.3  # stored operating point
    assert policy.bias_for(1.55) == pytest.approx(0.35 / 0.6, abs=1e-6)  # between (0.0, 1.2) and (1.0, 1.8)
    assert policy.bias_for(2.4) == pytest.approx(2.5)
    with pytest.raises(DashskipError, match="above the range this policy was calibrated for"):
        policy.bias_for(3.5)
    with pytest.raises(DashskipError, match=">= 1.0"):
        policy.bias_for(0.9)


def test_policy_file_round_trip_and_checks(tmp_path):
    policy = make_policy()
    path = tmp_path / "p.safetensors"
    policy.save(path)
    again = DashPolicy.load(path)
    assert again.meta["operating_points"] == {"1.50": 0.3}
    for k, v in policy.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])
    again.check("fp")
    with pytest.raises(DashskipError, match="another model"):
        again.check("other")
    path.with_name("cut.safetensors").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DashskipError, match="truncated or corrupt"):
        DashPolicy.load(tmp_path / "cut.safetensors")
    with pytest.raises(DashskipError, match="not found"):
        DashPolicy.load(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(DashskipError, match="not a dashskip policy"):
        DashPolicy.load(tmp_path / "plain.safetensors")


def test_policy_from_another_version_is_refused(tmp_path, monkeypatch):
    import dashskip.methods.dash.policy as pol

    monkeypatch.setattr(pol, "POLICY_VERSION", 0)
    make_policy().save(tmp_path / "old.safetensors")
    monkeypatch.setattr(pol, "POLICY_VERSION", 1)
    with pytest.raises(DashskipError, match="version 0"):
        DashPolicy.load(tmp_path / "old.safetensors")


def test_policy_on_another_model_and_bad_speedups_are_refused():
    model = tiny_model("llama")
    with pytest.raises(DashskipError, match="another model"):
        DashModel(model, policy=make_policy(fingerprint="not-this-one"))
    from dashskip.models.loading import fingerprint

    dm = DashModel(model, policy=make_policy(fingerprint=fingerprint(model)), speedup=1.5, wall_clock=False)
    assert dm.speedup == 1.5
    with pytest.raises(DashskipError, match="above the range this policy was calibrated for"):
        dm.set_speedup(5.0)
    with pytest.raises(DashskipError, match=">= 1.0"):
        dm.set_speedup(0.5)
    with pytest.raises(DashskipError, match="needs a trained policy"):
        DashModel(tiny_model("llama"), speedup=1.5)
    with pytest.raises(DashskipError, match="'copy' K/V rule"):
        DashModel(model, policy=make_policy(fingerprint=fingerprint(model)), kv_rule="project")


def test_nonfinite_skipped_path_is_rerun_in_full_with_one_warning():
    model = tiny_model("llama")
    scales = torch.ones(6)
    scales[2] = float("nan")
    engine = Engine(Backbone(model), scales=scales)
    from dashskip import FixedStates

    ids = torch.tensor([[5, 6, 7]])
    with pytest.warns(RuntimeWarning, match=r"non-finite hidden state.*layers \[2\]"):
        result = engine.step(ids, engine.new_session(1), FixedStates([4, 4, 0, 4, 4, 4]))
    assert torch.isfinite(result.hidden).all()
    assert result.states[0, :, 2].eq(4).all()
    full = engine.step(ids, engine.new_session(1)).hidden
    assert torch.allclose(result.hidden, full, atol=1e-6)


def test_per_row_biases_choose_what_each_rows_own_bias_chooses():
    from dashskip.methods.dash.policy import GreedyScorer

    torch.manual_seed(0)
    model = ScoringModel(PolicyConfig(64, 6, full_prior=0.0))
    costs = torch.tensor([0.1, 0.4, 0.5, 1.0])
    h = torch.randn(3, 5, 64) * 4
    biases = torch.tensor([-2.0, 0.5, 3.0])
    scorer = GreedyScorer(model, costs)
    for tokens in (5, 1):  # a prefill (row by row) and a decode step (one call)
        for previous in (4, STATE_VALUES[torch.randint(0, 4, (3, tokens))]):
            answer = scorer(h[:, :tokens], 2, previous, scorer.table(biases))
            for r, bias in enumerate(biases.tolist()):
                prev = previous[r : r + 1] if isinstance(previous, torch.Tensor) else previous
                alone = scorer(h[r : r + 1, :tokens], 2, prev, scorer.table(bias))
                assert torch.equal(answer[r : r + 1], torch.as_tensor(alone).expand(1, tokens))


def test_rate_control_steers_each_row_to_the_ratio_asked():
    """The tiny random policy at its calibrated bias runs everything in full (ratio 1.0, far from what is asked);
    with control each row of a batch lands within 3% of the target, and control off keeps the paper's bias."""
    from dashskip.core.costs import CostTable
    from dashskip.runtime.generation import generate

    policy = make_policy()
    engine = Engine(Backbone(tiny_model("llama")), scales=policy.scales())
    table = {int(k): v for k, v in policy.meta["cost_table"].items()}
    costs = CostTable(table, table)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    for target in (1.3, 1.8):
        fixed = generate(engine, ids, decider=policy.decider(target, control=False), max_new_tokens=64, costs=costs)
        assert fixed.compute_ratio < target * 0.9
        decider = policy.decider(target)
        for _ in range(2):  # a decider serves sequence after sequence: each prefill starts its control over
            out = generate(engine, ids, decider=decider, max_new_tokens=64, costs=costs)
            for row in range(2):
                assert abs(costs.compute_ratio(out.states[row : row + 1]) / target - 1) < 0.03


def test_rate_control_is_for_greedy_decisions():
    from dashskip.core.costs import CostTable
    from dashskip.methods.dash.control import RateControl

    policy = make_policy()
    table = {0: 0.0, 1: 0.4, 2: 0.5, 4: 1.0}
    control = RateControl(1.5, 0.3, CostTable(table, table), 6)
    with pytest.raises(DashskipError, match="greedy"):
        PolicyDecider(policy.model, policy.scales(), policy.costs(), 0.3, temperature=1.0, control=control)


def test_a_wall_clock_speedup_is_steered_on_this_machines_table():
    """With a table that knows what a token costs beyond its layers, a speedup is a wall-clock one: the policy is
    steered to the compute ratio that delivers it, every row's predicted speedup lands within 3%, and a speedup
    the policy cannot reach with that overhead is refused with the most it can do."""
    from dashskip.core.costs import CostTable
    from dashskip.runtime.generation import generate

    policy = make_policy()
    engine = Engine(Backbone(tiny_model("llama")), scales=policy.scales())
    table = {int(k): v for k, v in policy.meta["cost_table"].items()}
    key = policy.decision_key
    costs = CostTable(table, table, True, outside={"full": 3.0}, decisions={key: 0.5})
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    decider = policy.decider(1.3, costs=costs, head="full")
    assert decider.traits.decisions == key and decider.control.target == pytest.approx(6 / ((6 + 3) / 1.3 - 3.5))
    out = generate(engine, ids, decider=decider, max_new_tokens=64, costs=costs)
    assert out.compute_ratio > 1.6  # the layers save more than 1.3x: the head and the decisions cost the same
    for row in range(2):
        assert abs(costs.speedup(out.states[row : row + 1], "full", key) / 1.3 - 1) < 0.03
    assert abs(out.speedup / 1.3 - 1) < 0.03
    with pytest.raises(DashskipError, match="beyond this policy on this machine.*about 1.64x"):
        policy.decider(1.7, costs=costs, head="full")  # compute ratio 3.36; calibrated to 3.0: 9 / (2 + 3.5) = 1.64


def test_a_model_with_a_policy_measures_its_wall_clock_costs_per_head():
    from dashskip.models.loading import fingerprint

    model = tiny_model("llama")
    policy = make_policy(fingerprint=fingerprint(model))
    dm = DashModel(model, policy=policy)
    assert dm.costs.measured and dm.costs.wall_clock("full", policy.decision_key)
    dm.set_head("int8")  # measured now, unless an earlier run of the tests measured and kept it
    assert dm.backbone.head_precision == "int8" and dm.costs.wall_clock("int8", policy.decision_key)
    assert not DashModel(model, policy=policy, wall_clock=False).costs.wall_clock("full", None)


@pytest.mark.parametrize(
    "meta, message",
    [
        ("{not json", "has unreadable metadata"),
        ("[1, 2]", "metadata that is not a JSON object"),
        ("drop:kv_rule", "lacks 'kv_rule' in its metadata"),
        ("drop:policy_config", "lacks 'policy_config' in its metadata"),
        ("config:colour=1", "has an unusable policy_config"),
        ("config:hidden_size=32", "does not match its own config"),
    ],
)
def test_a_broken_policy_file_is_one_line_naming_the_file(tmp_path, meta, message):
    """Whatever is wrong inside a policy file, loading it is a `DashskipError` of one line naming the file, never
    a raw JSONDecodeError, KeyError or TypeError; through the CLI it is one line and exit 2."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from tests.conftest import run

    good = tmp_path / "good.safetensors"
    make_policy().save(good)
    with safe_open(str(good), framework="pt") as handle:
        raw = json.loads(handle.metadata()["dashskip"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    if meta.startswith("drop:"):
        raw.pop(meta[5:])
        meta = json.dumps(raw)
    elif meta.startswith("config:"):
        key, value = meta[7:].split("=")
        raw["policy_config"][key] = int(value)
        meta = json.dumps(raw)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"dashskip": meta})
    with pytest.raises(DashskipError, match=message) as info:
        DashPolicy.load(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    if message == "has unreadable metadata":  # the user's view, once
        out = run("generate", "hi", "--speedup", "1.2", "--policy", str(bad))
        assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and message in out.stderr


@pytest.mark.parametrize("tokens", [1, 5])
def test_rows_of_one_policy_are_decided_together_as_each_alone(by_rule, tokens):
    """`per_row` fuses requests of one policy at their own operating points (and requests in full) into one
    scoring call per layer; every row's states are exactly those it gets alone, each row keeps its own controller,
    and a row at 1.0x runs in full. Rows at far-apart biases make a row routed to another's bias visible."""
    from dashskip.core.decisions import Decider, PerRow, per_row
    from dashskip.methods.dash.policy import PolicyRows

    policy = make_policy()
    engine = Engine(Backbone(tiny_model("llama")), scales=policy.scales())
    ids = torch.randint(3, 97, (4, 6), generator=torch.Generator().manual_seed(1))
    points = [1.3, None, 2.9, 1.9]  # None: a request at 1.0x

    def deciders() -> list[Decider]:
        return [Decider() if p is None else policy.decider(p) for p in points]

    alone = []
    for r, decider in enumerate(deciders()):
        session = engine.new_session(1)
        steps = [engine.step(ids[r : r + 1], session, decider)]
        for _ in range(tokens):
            steps.append(engine.step(torch.tensor([[5]]), session, decider))
        alone.append((torch.cat([s.states for s in steps], 1), decider))
    together = deciders()
    fused = per_row(together)
    assert isinstance(fused, PolicyRows)
    session = engine.new_session(4)
    steps = [engine.step(ids, session, fused)]
    for _ in range(tokens):
        steps.append(engine.step(torch.full((4, 1), 5), session, per_row(together)))
    states = torch.cat([s.states for s in steps], 1)
    for r, (expected, decider) in enumerate(alone):
        assert torch.equal(states[r], expected[0]), f"row {r}"
        if points[r] is None:
            assert bool(states[r].eq(4).all())
        else:
            assert torch.equal(together[r].control.spent, decider.control.spent)  # its own controller only
    table = policy.cost_table()  # each row at its own point: a row given another's bias would move its ratio
    assert table.compute_ratio(states[0]) < table.compute_ratio(states[3]) < table.compute_ratio(states[2])
    assert isinstance(per_row([Decider(), Decider()]), Decider) and isinstance(per_row(together[:1]), type(together[0]))
    assert isinstance(per_row([policy.decider(1.3), make_policy().decider(1.3)]), PerRow)  # two scoring models


@pytest.mark.real
def test_a_forward_pass_of_a_new_sequence_runs_at_the_ratio_asked(smollm2):
    """`model(ids)` scores a new sequence as a window, held at the operating point by rate control (as perplexity
    is), where one pass at the calibrated bias lands wherever the text puts it (3-19% off on these windows);
    a continuation goes on from it. SmolLM2 with its shipped policy, held-out WikiText-2 test windows."""
    from dashskip.data import load_text, token_windows

    point = smollm2.operating_point(within_reach(smollm2, 1.4))
    costs = smollm2.costs
    windows = token_windows(smollm2.tokenizer, load_text("wikitext2"), 4, 96, seed=3).view(2, 2, 96)

    def misses(decider) -> list[float]:
        off = []
        for ids in windows:
            out = smollm2(ids, decider=decider)
            off += [abs(costs.compute_ratio(out.states[row]) / point.ratio - 1) for row in range(2)]
            more = smollm2(ids[:, -1:], past_key_values=out.past_key_values, decider=decider)
            assert more.logits.shape[:2] == (2, 1) and out.past_key_values.length == 97
        return off

    assert max(misses(smollm2.decider_for(point))) < 0.011  # the 1% a window is held to, and rounding
    fixed = smollm2.policy.decider(point, control=False, costs=costs, head=point.head)
    assert max(misses(fixed)) > 0.011  # the same windows at the calibrated bias miss it: the test can fail


def test_fused_scoring_leaves_each_sequence_deciding_as_alone():
    """The scorer keeps no bias (each sequence keeps its own table): after fused steps of sequences at other
    points, the first sequence alone decides as a fresh decider at its point does, after a prefill (row by row)
    and after a decode step of many rows (one product)."""
    from dashskip.core.decisions import per_row

    policy = make_policy()
    engine = Engine(Backbone(tiny_model("llama")), scales=policy.scales())
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    expected = engine.step(ids, engine.new_session(1), policy.decider(2.9, control=False)).states
    for batch, tokens in ((2, 6), (20, 1)):
        rows = [policy.decider(2.9 if r == 0 else 1.3, control=False) for r in range(batch)]
        session = engine.new_session(batch)
        engine.step(torch.randint(3, 97, (batch, 3)), session, per_row(rows))
        engine.step(torch.randint(3, 97, (batch, tokens)), session, per_row(rows))
        assert torch.equal(engine.step(ids, engine.new_session(1), rows[0]).states, expected), (batch, tokens)


def test_a_point_resolved_for_another_head_is_resolved_again():
    """A resolved point is taken as it is only for the head and unit it was resolved for: after `set_head` the
    same speedup needs another compute ratio; a point above 1.0 given to a model without a policy is refused."""
    from dashskip.models.loading import fingerprint

    model = tiny_model("llama")
    dm = DashModel(model, policy=make_policy(fingerprint=fingerprint(model)))
    dm.set_head("int8")  # both heads measured; then what a token costs beyond the layers set apart by hand:
    dm.set_head("full")  # a tiny model's head costs nothing measurable on some hosts, and both would resolve alike
    dm.costs.outside.update(full=4.0, int8=1.0)
    # and what the policy's decisions cost: a tiny model's layers take microseconds, so its measured decisions
    # range from under one of its layers to several over hosts (3.3 on an AMD EPYC: 1.2x out of reach)
    dm.costs.decisions[dm.policy.decision_key] = 0.5
    point = dm.operating_point(1.2)
    assert dm.operating_point(point) is point and point.head == "full"
    dm.set_head("int8")
    again = dm.operating_point(point)
    layers, key = dm.backbone.num_layers, dm.policy.decision_key
    assert again.head == "int8" and again.asked == 1.2
    assert again.ratio == pytest.approx(dm.costs.compute_target(1.2, layers, "int8", key))
    assert point.ratio == pytest.approx(dm.costs.compute_target(1.2, layers, "full", key)) != again.ratio
    with pytest.raises(DashskipError, match="needs a trained policy"):  # not an AttributeError
        DashModel(model).decider_for(point)
