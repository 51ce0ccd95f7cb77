import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dashskip import Backbone, Engine
from dashskip.core.costs import CostTable
from dashskip.core.losses import token_kl
from dashskip.errors import DashskipError
from dashskip.methods.dash.policy import DashPolicy
from dashskip.methods.dash.training import (
    TrainConfig,
    classification_reward,
    decision_rewards,
    fidelity_reward,
    lm_accuracy_reward,
    measure_ratio,
    position_weights,
    ratio_target_at,
    temperature,
    train,
)
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_temperature_schedule_decays_exponentially():
    assert temperature(0, 2.0, 0.01) == 2.0
    assert temperature(100, 2.0, 0.01) == pytest.approx(2.0 * math.exp(-1.0))
    assert temperature(50, 1.0, 0.0) == 1.0


def test_ratio_target_ramps_from_one_then_holds():
    cfg = TrainConfig(steps=100, ratio_target=2.5, ratio_ramp=0.5)
    assert [ratio_target_at(s, cfg) for s in (0, 24, 49, 50, 99)] == pytest.approx([1.03, 1.75, 2.5, 2.5, 2.5])
    assert ratio_target_at(0, TrainConfig(ratio_target=2.5)) == 2.5  # no ramp: the target from step one
    assert ratio_target_at(10, TrainConfig(ratio_target=None)) is None  # fixed beta
    with pytest.raises(DashskipError, match="needs a ratio target"):
        TrainConfig(ratio_target=None, ratio_ramp=0.5).check()
    with pytest.raises(DashskipError, match="ratio ramp"):
        TrainConfig(ratio_ramp=1.5).check()


def test_position_weights_by_hand():
    # path states 4, 0, 2, 4: |S_X| = 10, |S_M| = 16, |S_X,i| = 4, 4, 6
    w = position_weights(torch.tensor([[4, 0, 2, 4]]))[0]
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = [0.6 * sig(4 - 1.6), 0.6 * sig(0 - 1.6), 0.4 * sig(2 - 1.6)]
    assert w.tolist() == pytest.approx(expected, rel=1e-6)


def test_accuracy_rewards_by_hand():
    # ppl_full 10, ppl_skip 11, eps 0.05: (0.05 * 10 - 1) / 10 = -0.05
    r = lm_accuracy_reward(torch.tensor([math.log(10.0)]), torch.tensor([math.log(11.0)]), eps=0.05, floor=-4)
    assert float(r) == pytest.approx(-0.05, abs=1e-6)
    # identical paths earn eps; a catastrophic one is clipped at the floor
    assert float(lm_accuracy_reward(torch.tensor([1.0]), torch.tensor([1.0]), 0.05, -4)) == pytest.approx(0.05)
    assert float(lm_accuracy_reward(torch.tensor([1.0]), torch.tensor([9.0]), 0.05, -4)) == -4
    assert classification_reward(torch.tensor([True, False])).tolist() == [1.0, -1.0]


def test_fidelity_reward_and_token_kl_by_hand():
    # KL(p || q) for p = (0.5, 0.5), q = (0.9, 0.1): 0.5 log(0.5/0.9) + 0.5 log(0.5/0.1)
    p, q = torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.9, 0.1]))
    kl = token_kl(torch.stack([p, p])[None], torch.stack([q, p])[None])
    assert kl.shape == (1, 1)
    assert float(kl) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5.0), rel=1e-5)
    assert float(token_kl(torch.stack([p, p])[None], torch.stack([p + 3.0, q])[None])) == pytest.approx(0, abs=1e-7)
    # KL 0 earns eps; exp(KL) = 1.1 loses 0.1 of it, like a token whose perplexity rose 10%; the floor clips
    r = fidelity_reward(torch.tensor([0.0, math.log(1.1), 50.0]), eps=0.05, floor=-4)
    assert r.tolist() == pytest.approx([0.05, -0.05, -4.0], abs=1e-6)


def test_fidelity_training_logs_the_paths_divergence_and_refuses_unknown_rewards(tmp_path):
    engine = Engine(Backbone(tiny_model("llama")), scales=torch.full((6,), 1.05))
    corpus = torch.randint(3, 97, (3000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(
        steps=3, batch_size=2, seq_len=16, heldout_windows=2, heldout_len=32, targets=(1.5,), reward="fidelity",
        ratio_target=2.0, ratio_ramp=1.0,
    )  # fmt: skip
    train(engine, corpus, CostTable.default(), cfg, tmp_path, {"fingerprint": "fp"}, progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    # paths sampled at temperature 1 take cheaper states on some tokens, so their predictions move off the full one
    assert all(e["kl"] >= 0 for e in log) and any(e["kl"] > 0 for e in log)
    assert [e["ratio_target"] for e in log] == [round(ratio_target_at(s, cfg), 4) for s in range(3)]  # ramped
    longer = TrainConfig(**{**cfg.__dict__, "steps": 6})  # more steps would move a ramp's targets: refused
    with pytest.raises(DashskipError, match="different training run"):
        train(engine, corpus, CostTable.default(), longer, tmp_path, {"fingerprint": "fp"}, progress=False)
    with pytest.raises(DashskipError, match="'label' or 'fidelity'"):
        train(engine, corpus, CostTable.default(), TrainConfig(reward="nll"), tmp_path / "x", {"fingerprint": "x"})


def test_decision_rewards_combine_accuracy_and_efficiency():
    states = torch.tensor([[4, 0, 2, 4]])
    r = decision_rewards(states, torch.tensor([-0.5]), beta=0.1)[0]
    w = position_weights(states)[0]
    assert r.tolist() == pytest.approx((-0.5 * w + 0.1 * torch.tensor([4.0, 2.0, 0.0])).tolist())


def test_training_is_reproducible_and_writes_log_checkpoint_and_policy(tmp_path):
    engine = Engine(Backbone(tiny_model("llama")), scales=torch.full((6,), 1.05))
    corpus = torch.randint(3, 97, (3000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(
        steps=6, batch_size=2, seq_len=16, checkpoint_every=3, heldout_windows=4, heldout_len=32, targets=(1.5, 2.0)
    )
    a = train(engine, corpus, CostTable.default(), cfg, tmp_path / "a", {"fingerprint": "fp"}, progress=False)
    b = train(engine, corpus, CostTable.default(), cfg, tmp_path / "b", {"fingerprint": "fp"}, progress=False)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 7))
    assert {"reward", "compute_ratio", "ppl_gap", "temperature"} <= set(log[0])
    assert "kl" not in log[0]  # the label reward (the default) never computes the divergence
    assert (tmp_path / "a" / "checkpoint.pt").exists()
    policy = DashPolicy.load(tmp_path / "a" / "policy.safetensors")
    assert set(policy.meta["operating_points"]) == {"1.50", "2.00"}
    # each operating point lands within 3% of its target on the held-out windows
    for target, ratio in policy.meta["operating_point_ratios"].items():
        assert abs(ratio / float(target) - 1) < 0.03


def test_operating_points_hold_on_unseen_text(tmp_path):
    engine = Engine(Backbone(tiny_model("llama")), scales=torch.full((6,), 1.05))
    gen = torch.Generator().manual_seed(1)
    corpus = torch.randint(3, 97, (4000,), generator=gen)
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=32, heldout_windows=12, heldout_len=32, targets=(1.33, 1.67))
    policy = train(engine, corpus, CostTable.default(), cfg, tmp_path, {"fingerprint": "fp"}, progress=False)
    unseen = torch.randint(3, 97, (32, 32), generator=gen)
    for target in (1.33, 1.67):
        ratio = measure_ratio(policy, engine, unseen, policy.bias_for(target), CostTable.default())
        assert abs(ratio / target - 1) < 0.03


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.train_tiny", str(tmp_path / "killed"), "300"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # at once: 300 steps take far longer than one poll, on any host
    proc.wait()
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step_at_kill < 300, "the kill must land mid-run"
    # the same command again (it resumes) beside the uninterrupted run: each trains on one thread
    runs = [subprocess.Popen(c, cwd=ROOT, env=env) for c in (cmd, [*cmd[:-2], str(tmp_path / "whole"), "300"])]
    assert [r.wait() for r in runs] == [0, 0]
    resumed = load_file(tmp_path / "killed" / "policy.safetensors")
    whole = load_file(tmp_path / "whole" / "policy.safetensors")
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 301))


def test_training_refuses_bad_settings_and_foreign_checkpoints(tmp_path):
    engine = Engine(Backbone(tiny_model("llama")))
    corpus = torch.randint(3, 97, (3000,))
    with pytest.raises(DashskipError, match="too few"):
        train(engine, corpus[:50], CostTable.default(), TrainConfig(seq_len=16), tmp_path, {"fingerprint": "x"})
    with pytest.raises(DashskipError, match="too few"):
        train(engine, corpus[:300], CostTable.default(), TrainConfig(seq_len=16), tmp_path, {"fingerprint": "x"})
    with pytest.raises(DashskipError, match="operating points must be >= 1.0"):
        train(engine, corpus, CostTable.default(), TrainConfig(targets=(0.5,)), tmp_path, {"fingerprint": "x"})
    cfg = TrainConfig(
        steps=2, batch_size=1, seq_len=16, checkpoint_every=1, heldout_windows=2, heldout_len=16, targets=(1.2,)
    )
    train(engine, corpus, CostTable.default(), cfg, tmp_path, {"fingerprint": "x"}, progress=False)
    other = TrainConfig(
        steps=2, batch_size=1, seq_len=16, checkpoint_every=1, heldout_windows=2, heldout_len=16, targets=(1.2,), lr=0.5
    )
    with pytest.raises(DashskipError, match="different training run"):
        train(engine, corpus, CostTable.default(), other, tmp_path, {"fingerprint": "x"}, progress=False)


def test_choice_scoring_picks_the_most_likely_continuation_by_hand():
    from dashskip.methods.dash.training import ChoiceQuestion, choice_batch, choice_correct

    questions = [ChoiceQuestion([5, 6], [[7], [8, 9]], answer=1), ChoiceQuestion([5], [[7], [8]], answer=0)]
    ids, attention, continuation, owner = choice_batch(questions)
    assert ids.tolist() == [[5, 6, 7, 0], [5, 6, 8, 9], [5, 7, 0, 0], [5, 8, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert continuation.tolist() == [[0, 0, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0], [0, 1, 0, 0]]
    assert owner == [0, 0, 1, 1]
    logits = torch.zeros(4, 4, 10)
    logits[1, 1, 8] = logits[1, 2, 9] = 5.0  # question 0: choice 1 scores higher -> right
    logits[3, 0, 8] = 5.0  # question 1: choice 1 scores higher -> wrong
    assert choice_correct(logits, ids, continuation, owner, questions).tolist() == [True, True, False, False]


def test_classification_reward_training_on_multiple_choice(tmp_path):
    from dashskip.methods.dash.training import ChoiceQuestion

    engine = Engine(Backbone(tiny_model("llama")), scales=torch.full((6,), 1.05))
    gen = torch.Generator().manual_seed(0)
    questions = [
        ChoiceQuestion(
            torch.randint(3, 97, (6,), generator=gen).tolist(),
            [torch.randint(3, 97, (2,), generator=gen).tolist() for _ in range(3)],
            answer=i % 3,
        )
        for i in range(30)
    ]
    cfg = TrainConfig(steps=3, batch_size=2, checkpoint_every=2, targets=(1.3,))
    policy = train(engine, questions, CostTable.default(), cfg, tmp_path, {"fingerprint": "fp"}, progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(0 <= e["accuracy"] <= 1 for e in log)
    assert abs(policy.meta["operating_point_ratios"]["1.30"] / 1.3 - 1) < 0.03
    with pytest.raises(DashskipError, match="too few"):
        train(engine, questions[:2], CostTable.default(), cfg, tmp_path / "x", {"fingerprint": "fp"}, progress=False)


def test_arc_questions_load_from_the_shared_data():
    from dashskip.data import load_choice_questions

    items = load_choice_questions("arc-easy")
    assert len(items) == 2376
    prompt, choices, answer = items[0]
    assert prompt.startswith("Question: Which statement best explains") and prompt.endswith("\nAnswer:")
    assert choices[answer] == " Sunlight is the source of energy for nearly all ecosystems."
    with pytest.raises(DashskipError, match="unknown multiple-choice set"):
        load_choice_questions("arc-hard")


def test_operating_points_are_offered_only_where_the_policy_keeps_its_quality(tmp_path):
    """With a perplexity budget the ratio curve ends below the first ratio that loses more, targets beyond are
    dropped and asking for them is refused; without one every target is calibrated."""
    engine = Engine(Backbone(tiny_model("llama")), scales=torch.full((6,), 1.05))
    corpus = torch.randint(3, 97, (3000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, heldout_windows=4, heldout_len=32, targets=(1.2, 3.0),
                      max_ppl_loss=0.02)  # fmt: skip
    policy = train(engine, corpus, CostTable.default(), cfg, tmp_path, {"fingerprint": "fp"}, progress=False)
    limit = policy.meta["quality_limit"]
    assert limit["top_ppl"] <= limit["full_ppl"] * 1.02 + 1e-6 and policy.max_speedup() == limit["top_ratio"]
    assert "3.00" not in policy.meta["operating_points"] and limit["top_ratio"] < 3.0
    with pytest.raises(DashskipError, match="above the range this policy was calibrated for"):
        policy.bias_for(3.0)


def test_calibration_keeps_the_states_each_bias_ran(tmp_path):
    """A calibrated policy keeps, per bias of its curve, the share of the held-out token-layers in each state: on
    its own table they give back its curve; on a slower host's table, the ratio the same bias runs at there."""
    engine = Engine(Backbone(tiny_model("llama")), scales=torch.full((6,), 1.05))
    corpus = torch.randint(3, 97, (4000,), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32, heldout_windows=6, heldout_len=32, targets=(1.5,))
    train(engine, corpus, CostTable.default(), cfg, tmp_path, {"fingerprint": "fp"}, progress=False)
    policy = DashPolicy.load(tmp_path / "policy.safetensors")  # what the file keeps
    curve = policy.curve
    assert set(curve.states) == set(curve.tried) and len(curve.tried) > 3
    own = CostTable.default()
    assert curve.on(own).tried == pytest.approx(curve.tried, rel=1e-4)
    slow = CostTable({**own.decode, 0: 0.1, 2: 0.8}, {**own.decode, 0: 0.1, 2: 0.8})
    assert policy.max_speedup(slow) < policy.max_speedup()
