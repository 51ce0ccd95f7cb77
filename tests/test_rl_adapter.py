"""The RL-adapter baseline: adapter arithmetic, batch-majority votes, operating points, training, files."""

import json

import pytest
import torch
from torch.nn import functional as F

from dashskip import Backbone, DashModel, Engine, FixedStates
from dashskip.core.costs import CostTable
from dashskip.core.decisions import BatchMajority, Decider
from dashskip.errors import DashskipError
from dashskip.methods.rl_adapter import (
    AdapterBank,
    AdapterConfig,
    AdapterEngine,
    ControllerVotes,
    RLAdapter,
    RLAdapterConfig,
    pretrain_loss,
    train_rl_adapter,
)
from tests.conftest import tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices on a shared 2-core machine: a second intra-op thread only waits for the other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


COSTS = CostTable(decode={0: 0.17, 1: 0.36, 2: 0.45, 4: 1.0}, prefill={0: 0.07, 1: 0.72, 2: 0.6, 4: 1.0})


def random_bank(seed: int = 0, bottleneck: int = 8) -> AdapterBank:
    """Adapters and heads with every weight non-zero (a freshly built bank has W2 = 0)."""
    torch.manual_seed(seed)
    bank = AdapterBank(AdapterConfig(64, 6, bottleneck))
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.3)
    return bank.eval()


def ids(rows: int = 2, tokens: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (rows, tokens), generator=torch.Generator().manual_seed(seed))


class Inputs(Decider):
    """Records the input of every layer and runs the wrapped decider."""

    def __init__(self, inner: Decider | None = None) -> None:
        self.inner, self.seen = inner or Decider(), {}

    def __call__(self, layer, hidden, previous):
        self.seen[layer] = hidden.clone()
        return self.inner(layer, hidden, previous)


def by_hand(bank: AdapterBank, i: int, x: torch.Tensor) -> torch.Tensor:
    h = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    return F.linear(F.gelu(F.linear(h, bank.down[i].weight, bank.down[i].bias)), bank.up[i].weight, bank.up[i].bias)


def test_untrained_adapters_leave_the_full_path_unchanged(family):
    model = tiny_model(family)
    bb = Backbone(model)
    x = ids()
    plain = bb.logits(Engine(bb).step(x, Engine(bb).new_session(2)).hidden)
    engine = AdapterEngine(bb, AdapterBank(AdapterConfig(64, 6, 8)))
    ours = bb.logits(engine.step(x, engine.new_session(2)).hidden)
    assert torch.equal(ours, plain)


def test_full_layers_add_the_adapter_to_the_transformers_layer_output():
    model = tiny_model("llama")
    bank = random_bank()
    x = ids()
    hooks = []
    for i, layer in enumerate(model.model.layers):  # an independent implementation: transformers plus hooks
        hooks.append(
            layer.register_forward_hook(
                lambda m, args, kwargs, out, i=i: (
                    out + by_hand(bank, i, kwargs.get("hidden_states", args[0] if args else None))
                ),
                with_kwargs=True,
            )
        )
    try:
        with torch.no_grad():
            ref = model(x).logits
    finally:
        for h in hooks:
            h.remove()
    engine = AdapterEngine(Backbone(model), bank)
    ours = engine.backbone.logits(engine.step(x, engine.new_session(2)).hidden)
    assert float((ours - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_a_skipped_layer_outputs_its_input_plus_its_adapter(scale):
    bank = random_bank()
    engine = AdapterEngine(Backbone(tiny_model("llama")), bank, scales=torch.full((6,), scale))
    seen = Inputs(FixedStates([4, 4, 0, 4, 4, 4]))
    engine.step(ids(), engine.new_session(2), seen)
    x2 = seen.seen[2]
    expected = scale * x2 + by_hand(bank, 2, x2)
    assert torch.allclose(seen.seen[3], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen.seen[3], scale * x2, atol=1e-3)  # the adapter does contribute


def test_votes_skip_a_layer_for_the_batch_when_more_than_half_vote_so():
    engine = AdapterEngine(Backbone(tiny_model("llama")), random_bank())
    majority = BatchMajority(ControllerVotes(engine, threshold=0.0))
    hidden = torch.zeros(3, 4, 64)
    # 3 rows, 4 positions: skip votes per position 2/3, 1/3, 3/3, 0/3
    engine.skip_logit = torch.tensor([[1.0, 1.0, 1.0, -1.0], [1.0, -1.0, 1.0, -1.0], [-1.0, -1.0, 1.0, -1.0]])
    assert majority(2, hidden, 4).tolist() == [[0, 4, 0, 4]] * 3
    # 2 rows: a tie is not "more than half"
    engine.skip_logit = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    assert majority(2, hidden[:2, :2], 4).tolist() == [[4, 0], [4, 0]]
    # batch 1: every token by its own vote; the first and last layer never skip
    engine.skip_logit = torch.tensor([[1.0, -1.0, 0.5]])
    assert majority(2, hidden[:1, :3], 4).tolist() == [[0, 4, 0]]
    assert majority(0, hidden[:1, :3], 4) == 4 and majority(5, hidden[:1, :3], 4) == 4
    engine.skip_logit = torch.tensor([[0.3]])
    assert majority(1, hidden[:1, :1], 4) == 0


def test_batch_votes_in_the_engine_give_one_state_per_position():
    bank = random_bank(bottleneck=8)
    engine = AdapterEngine(Backbone(tiny_model("llama")), bank)
    states = engine.step(ids(4, 10), engine.new_session(4), BatchMajority(ControllerVotes(engine, 0.0))).states
    assert (states == states[:1]).all()
    assert (states[..., 1:-1] == 0).any() and (states[..., 1:-1] == 4).any()
    per_token = engine.step(ids(4, 10), engine.new_session(4), ControllerVotes(engine, 0.0)).states
    assert not (per_token == per_token[:1]).all()  # without the majority, rows do differ


@pytest.mark.parametrize("batch", [1, 3])
def test_calibrated_thresholds_hit_the_requested_ratio_and_refuse_unreachable_ones(batch):
    bank = random_bank()
    adapter = RLAdapter(bank, {"kv_rule": "project"})
    engine = AdapterEngine(Backbone(tiny_model("llama")), bank)
    heldout = ids(6, 24, seed=1)
    adapter.calibrate(engine, heldout, COSTS, (1.2, 1.5, 1.8), batch_size=batch, progress=False)
    for target in (1.2, 1.5, 1.8):
        z = adapter.threshold_for(target)
        ratio = adapter.measure_ratio(engine, heldout, z, COSTS, batch)
        assert abs(ratio / target - 1) <= 0.03, (target, ratio)
    # the decider a caller gets votes by batch majority: at batch 3, one state per position for all rows
    states = engine.step(heldout[:3], engine.new_session(3), adapter.decider(engine, 1.5)).states
    assert (states == states[:1]).all() and (states == 0).any()
    # an uncalibrated point between two calibrated ones interpolates on the measured curve
    assert adapter.threshold_for(1.5) <= adapter.threshold_for(1.35) <= adapter.threshold_for(1.2)
    # 6 layers, 4 inner ones skipped at 0.17 of a full layer: 6 / (2 + 4 * 0.17) = 2.24 at most
    assert adapter.max_speedup() == pytest.approx(6 / 2.68)
    with pytest.raises(DashskipError, match=r"up to 2\.24.*3\.0 is out of reach"):
        adapter.decider(engine, 3.0)
    with pytest.raises(DashskipError, match=r"\[1\.0, 2\.24\]"):
        adapter.calibrate(engine, heldout, COSTS, (2.5,), progress=False)
    with pytest.raises(DashskipError, match="speedup must be >= 1.0"):
        adapter.decider(engine, 0.5)


SMALL = dict(
    bottleneck=8,
    batch_size=2,
    init_steps=2,
    pretrain_steps=4,
    rl_steps=4,
    checkpoint_every=3,
    heldout_windows=4,
    targets=(1.3,),
)


def windows(n: int = 16, tokens: int = 16) -> torch.Tensor:
    return ids(n, tokens, seed=3)


def test_training_runs_logs_every_stage_and_calibrates(tmp_path):
    dm = DashModel(tiny_model("llama"))  # a DashModel or a transformers model alike
    adapter = train_rl_adapter(dm, windows(), RLAdapterConfig(**SMALL), tmp_path, progress=False, costs=COSTS)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in log] == ["init"] * 2 + ["pretrain"] * 4 + ["rl"] * 4
    assert {"reward", "compute_ratio", "ppl_sampled", "bonus_run"} <= set(log[-1])
    assert [e["bonus_run"] for e in log[6:]] == [3, 1, 0, 0]  # M = 3 stepping down to 0 over 30% of 4 steps
    assert abs(adapter.meta["operating_point_ratios"]["1.30"] / 1.3 - 1) <= 0.03
    assert adapter.meta["fingerprint"] == dm.fingerprint and adapter.meta["cost_table"]["0"] == 0.17


def test_stage_two_training_lowers_the_pretraining_loss_on_a_fixed_batch(tmp_path):
    model = tiny_model("llama")
    batch = windows(2, 16)
    cfg = RLAdapterConfig(
        **{**SMALL, "init_steps": 0, "pretrain_steps": 12, "rl_steps": 0, "pretrain_lr": 1e-2, "heldout_windows": 1}
    )
    masks = torch.zeros(2, 2, 6, dtype=torch.bool)
    masks[0, :, 2] = masks[1, :, 3] = masks[1, 0, 1] = True

    def loss_with(bank: AdapterBank) -> float:
        with torch.no_grad():
            return float(pretrain_loss(AdapterEngine(Backbone(model), bank), batch, masks, cfg)[0])

    before = loss_with(AdapterBank(AdapterConfig(64, 6, 8)))
    adapter = train_rl_adapter(model, torch.cat([batch, batch[:1]]), cfg, tmp_path, progress=False)
    after = loss_with(adapter.bank)
    assert after < 0.8 * before, (before, after)


def test_a_crashed_run_resumes_to_the_uninterrupted_state(tmp_path, monkeypatch):
    import dashskip.methods.rl_adapter as rl

    cfg = RLAdapterConfig(**SMALL)
    whole = train_rl_adapter(tiny_model("llama"), windows(), cfg, tmp_path / "whole", progress=False)
    real, calls = rl.pretrain_loss, []

    def crash_on_fifth_step(*args, **kwargs):  # steps 3-6 are stage 2; the last checkpoint is after step 3
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "pretrain_loss", crash_on_fifth_step)
    with pytest.raises(KeyboardInterrupt):
        train_rl_adapter(tiny_model("llama"), windows(), cfg, tmp_path / "crashed", progress=False)
    assert torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=False)["step"] == 3
    monkeypatch.setattr(rl, "pretrain_loss", real)
    resumed = train_rl_adapter(tiny_model("llama"), windows(), cfg, tmp_path / "crashed", progress=False)
    for key, value in whole.bank.state_dict().items():
        assert torch.equal(resumed.bank.state_dict()[key], value), key
    assert (tmp_path / "crashed" / "train_log.jsonl").read_text() == (
        tmp_path / "whole" / "train_log.jsonl"
    ).read_text()
    other = RLAdapterConfig(**{**SMALL, "lam": 0.5})
    with pytest.raises(DashskipError, match="different RL-adapter run"):
        train_rl_adapter(tiny_model("llama"), windows(), other, tmp_path / "crashed", progress=False)


def test_file_round_trip_and_model_checks(tmp_path):
    model = tiny_model("llama")
    trained = train_rl_adapter(model, windows(), RLAdapterConfig(**SMALL), tmp_path, progress=False)
    loaded = RLAdapter.load(tmp_path / "rl_adapter.safetensors")
    for key, value in trained.bank.state_dict().items():
        assert torch.equal(loaded.bank.state_dict()[key], value), key
    assert loaded.meta["thresholds"] == trained.meta["thresholds"]
    engine = loaded.engine(model)
    x = windows(3, 16)
    a = trained.engine(model)
    assert torch.equal(
        engine.step(x, engine.new_session(3), loaded.decider(engine, 1.3)).states,
        a.step(x, a.new_session(3), trained.decider(a, 1.3)).states,
    )
    with pytest.raises(DashskipError, match="trained on another model"):
        loaded.engine(tiny_model("llama", seed=1))
    with pytest.raises(DashskipError, match="other adapters"):
        trained.decider(engine, 1.3)
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    with pytest.raises(DashskipError, match="truncated or corrupt"):
        RLAdapter.load(tmp_path / "broken.safetensors")
    with pytest.raises(DashskipError, match="not found"):
        RLAdapter.load(tmp_path / "missing.safetensors")
