"""Policy-gradient training of the DASH scoring model with differential rewards (METHOD.md eq. 11-17).

An episode is one token's path through the layers: at every layer the policy
samples the next layer's state at a decaying temperature (eq. 11), the token's
next-token prediction on that path is compared with the full model's, and each
decision is rewarded r_i = r_acc * w_i + r_eff (eq. 12-16). REINFORCE with a
per-layer batch-mean baseline updates the scoring model; the backbone stays
frozen. The engine, states and K/V rule are the ones inference uses.

Checkpoints (policy, optimizer, step) are written atomically every N steps and
training resumes from the last one when the same command is run again; batches
and sampling noise are functions of (seed, step), so a resumed run reproduces
the uninterrupted one.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from dashskip.core.costs import CostTable
from dashskip.core.files import atomic_torch_save, truncate_log
from dashskip.core.losses import token_kl, token_nll
from dashskip.core.operating import OperatingCurve
from dashskip.core.states import FULL_BITS, code_lookup, registered
from dashskip.data import text_ids, with_bos
from dashskip.errors import DashskipError
from dashskip.methods.dash.policy import DashPolicy, PolicyConfig, PolicyDecider, ScoringModel
from dashskip.runtime.engine import Engine

DEFAULT_TARGETS = (1.33, 1.67, 2.0)


@dataclass
class TrainConfig:
    """Defaults are what the shipped SmolLM2 policy was trained with."""

    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 5e-4
    beta: float = 0.02  # initial weight of the efficiency reward r_eff = beta * e(s)
    # e(s): "bits" = 4 - s as in METHOD.md; "measured" = 4 * (1 - c(s)) from the machine's cost table, so the
    # reward follows what a state really saves here (on SmolLM2 both still drive the policy to INT4: docs/policy.md).
    efficiency: str = "bits"
    # The constraint of eq. 5 in training: beta follows dual ascent so the sampled paths' compute ratio tracks
    # this value (None: fixed beta). Needed because w_i -> 0 on cheap paths (|S_M| / |S_X| grows), so with a fixed
    # beta the efficiency reward wins once paths get cheap and the policy collapses to skipping everything.
    ratio_target: float | None = 1.5
    beta_rate: float = 0.05  # step size of the dual ascent on log(beta); larger steps overshoot into collapse
    # Fraction of the steps over which the ratio target rises linearly from 1.0 to ratio_target (0: from step one),
    # a curriculum for the dual ascent. On SmolLM2 it did not stop the early overshoot nor the lock-in on INT8 that
    # follows (docs/results.md, "policies trained on fidelity"); kept because that recorded run used it.
    ratio_ramp: float = 0.0
    beta_min: float = 1e-4
    beta_max: float = 0.2
    # Tolerated relative perplexity change of a token before r_acc turns negative. With w_i -> 0 on cheap paths, a
    # path whose r_acc is negative scores *below* skipping everything, so eps must keep ordinary paths positive.
    eps: float = 2.0
    # r_acc from "label": the perplexity ratio on the text's next token (eq. 13); "fidelity": the same ratio taken
    # over the full model's whole predicted distribution, exp(KL(full || path)). One label is a noisy witness (a
    # path can move its probability a lot while barely changing the prediction, or the reverse); the fidelity
    # ratio scores the whole prediction, so the reward tells cheap tokens from expensive ones with far less noise
    # (the oracle in docs/results.md: per-token choice by KL is what beats static schedules above static INT8).
    reward: str = "label"
    reward_floor: float = -4.0  # r_acc is clipped from below: one very wrong token must not dominate a batch
    tau0: float = 1.0  # eq. 11: tau(t) = tau0 * exp(-tau_decay * t)
    tau_decay: float = 0.005
    seed: int = 0
    checkpoint_every: int = 20
    kv_rule: str = "project"  # per-token skipping with "copy" wrecks perplexity (docs/foundation.md)
    mode: str = "async"
    # Operating points are calibrated on windows from the held-out tail of the training text (never trained on).
    # Windows as long as the evaluation's matter: the policy skips more late in a sequence.
    heldout_fraction: float = 0.1
    heldout_windows: int = 12
    heldout_len: int = 256
    targets: tuple[float, ...] = DEFAULT_TARGETS
    # Held-out perplexity an operating point may lose against the full model (0.05: 5%); the ratio curve, and with
    # it the range a user may ask for, ends below the first point that loses more. None: no limit.
    max_ppl_loss: float | None = None
    policy: dict[str, Any] = field(default_factory=dict)  # PolicyConfig overrides (layer_dim, hidden1, ...)
    bos_token_id: int | None = None  # put first in every window, for models that expect it (Gemma)

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise DashskipError("need steps >= 1, batch size >= 1 and sequence length >= 8")
        if self.checkpoint_every < 1:
            raise DashskipError("checkpoint interval must be >= 1 step")
        if not 0.0 <= self.ratio_ramp <= 1.0:
            raise DashskipError(f"ratio ramp is a fraction of the steps in [0, 1], got {self.ratio_ramp}")
        if self.ratio_ramp > 0 and self.ratio_target is None:
            raise DashskipError("a ratio ramp needs a ratio target to ramp to; give --ratio-target or drop the ramp")
        if self.reward not in ("label", "fidelity"):
            raise DashskipError(f"accuracy reward must be 'label' or 'fidelity', got '{self.reward}'")
        if self.efficiency not in ("measured", "bits"):
            raise DashskipError(f"efficiency reward must be 'measured' or 'bits', got '{self.efficiency}'")
        if any(t < 1.0 for t in self.targets):
            raise DashskipError(f"operating points must be >= 1.0, got {list(self.targets)}")


def temperature(step: int, tau0: float, decay: float) -> float:
    """Sampling temperature at a training step (eq. 11)."""
    return tau0 * math.exp(-decay * step)


def levels(states: torch.Tensor) -> torch.Tensor:
    """State codes -> their levels s (bits / 4, METHOD.md's 0/1/2/4)."""
    return code_lookup({spec.code: spec.level for spec in registered()})[states.long()]


def position_weights(states: torch.Tensor, max_state: float = FULL_BITS / 4) -> torch.Tensor:
    """w_i for the decision of layer i+1 made at layer i, i = 1..L-1 (eq. 15): shape (..., L-1).

    w_i = ((|S_X| - |S_X,i|) / |S_X|) * sigmoid(s_i - |S_M| / |S_X|), with |S_X| the sum of the states' levels on
    the path, |S_X,i| the sum over layers 1..i and |S_M| = max_state * L.
    """
    s = levels(states)
    total = s.sum(-1, keepdim=True).clamp(min=1e-6)
    upto = s.cumsum(-1)[..., :-1]
    most = max_state * s.shape[-1]
    return (total - upto) / total * torch.sigmoid(s[..., :-1] - most / total)


def lm_accuracy_reward(nll_full: torch.Tensor, nll_skip: torch.Tensor, eps: float, floor: float) -> torch.Tensor:
    """r_acc = (eps - |ppl_full - ppl_skip|) / ppl_full per token, with eps relative to ppl_full (eq. 13)."""
    ratio = torch.exp(nll_skip - nll_full)  # ppl_skip / ppl_full, computed without overflow
    return (eps - (1 - ratio).abs()).clamp(min=floor)


def fidelity_reward(kl: torch.Tensor, eps: float, floor: float) -> torch.Tensor:
    """r_acc = eps - (exp(KL) - 1) per token: eq. 13 with ppl_skip / ppl_full taken over the full model's predicted
    distribution instead of the one text label (KL >= 0, so the ratio is >= 1 and no path is rewarded for luck)."""
    return (eps - torch.expm1(kl.clamp(max=20.0))).clamp(min=floor)


def classification_reward(correct: torch.Tensor) -> torch.Tensor:
    """r_acc = +1 if the skipped path's prediction is correct, -1 otherwise (eq. 12)."""
    return correct.float() * 2 - 1


def efficiency_values(kind: str, costs: CostTable) -> torch.Tensor:
    """e(s) indexed by state code: the saving a state earns in r_eff = beta * e(s). 'bits': the levels it saves
    below full precision (METHOD.md's 4 - s); 'measured': 4 * (1 - c(s)) from this machine's cost table."""
    full = FULL_BITS / 4
    return code_lookup(
        {s.code: full - s.level if kind == "bits" else full * (1.0 - costs.cost(s.code)) for s in registered()}
    )


def decision_rewards(
    states: torch.Tensor, r_acc: torch.Tensor, beta: float, efficiency: torch.Tensor | None = None
) -> torch.Tensor:
    """r_i = r_acc * w_i + beta * e(s_{i+1}) for every decision; states (..., L), r_acc (...) -> (..., L-1).

    `efficiency` maps state codes to e(s); None is METHOD.md's 4 - s.
    """
    nxt = states[..., 1:].long()
    saving = (FULL_BITS / 4 - levels(nxt)) if efficiency is None else efficiency[nxt]
    return r_acc[..., None] * position_weights(states) + beta * saving


def _batch(corpus: torch.Tensor, cfg: TrainConfig, step: int, limit: int) -> torch.Tensor:
    rng = random.Random(cfg.seed * 1_000_003 + step)
    content = cfg.seq_len - (cfg.bos_token_id is not None)
    starts = [rng.randrange(0, limit - content) for _ in range(cfg.batch_size)]
    return with_bos(torch.stack([corpus[s : s + content] for s in starts]), cfg.bos_token_id)


def reinforce_loss(
    records, rewards: torch.Tensor, temp: float, model: ScoringModel, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """-sum (r - b) log pi over recorded decisions, b = the batch mean reward of each decision layer.

    `rewards` is (batch, tokens', L-1) for the first tokens' positions that have a reward (text: all but the
    last token); `mask` (batch, tokens') drops padding.
    """
    scored = rewards.shape[1]
    losses = []
    for rec in records:
        r = rewards[:, :, rec.nxt - 1]
        scores = model(rec.hidden[:, :scored], rec.current, rec.nxt, rec.previous[:, :scored]) / temp
        logp = F.log_softmax(scores, -1).gather(-1, rec.index[:, :scored, None]).squeeze(-1)
        if mask is None:
            losses.append(-((r - r.mean()) * logp).mean())
        else:
            count = mask.sum().clamp(min=1)
            advantage = r - (r * mask).sum() / count
            losses.append(-(advantage * logp * mask).sum() / count)
    return torch.stack(losses).mean()


@dataclass
class ChoiceQuestion:
    """A multiple-choice item, tokenized: the context, each answer continuation, and the right index."""

    context: list[int]
    choices: list[list[int]]
    answer: int


def choice_batch(questions: list[ChoiceQuestion]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded context+choice sequences: ids, attention mask, continuation mask, question index per row."""
    rows = [(q.context + c, len(q.context), qi) for qi, q in enumerate(questions) for c in q.choices]
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    continuation = torch.zeros(len(rows), width)
    for i, (seq, ctx, _) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        continuation[i, ctx : len(seq)] = 1
    return ids, attention, continuation, [r[2] for r in rows]


def choice_correct(
    logits: torch.Tensor, ids: torch.Tensor, continuation: torch.Tensor, owner: list[int], questions
) -> torch.Tensor:
    """Per row: was its question answered right (the highest summed log-likelihood continuation)?"""
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    score = (logp * continuation[:, 1:]).sum(-1)
    correct = torch.zeros(len(owner), dtype=torch.bool)
    for qi, q in enumerate(questions):
        rows = [i for i, o in enumerate(owner) if o == qi]
        chosen = rows[int(score[rows].argmax())] - rows[0]
        correct[rows] = chosen == q.answer
    return correct


def train(
    engine: Engine,
    corpus: torch.Tensor | list[ChoiceQuestion],
    costs: CostTable,
    cfg: TrainConfig,
    out_dir: str | Path,
    meta: dict[str, Any],
    progress: bool = True,
) -> DashPolicy:
    """Train a policy; write checkpoints, a JSONL log and `policy.safetensors`.

    `corpus` is either text (1-D token ids: language-model reward from perplexity) or multiple-choice questions
    (classification reward: +1 if the sampled path picks the right answer, -1 otherwise, for every decision of
    every token of the question).
    """
    cfg.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(corpus, list):
        return _train_choice(engine, corpus, costs, cfg, out, meta, progress)
    bb = engine.backbone
    limit = int(corpus.numel() * (1 - cfg.heldout_fraction))  # the tail is held out for the operating points
    heldout_count = min(cfg.heldout_windows, (corpus.numel() - limit) // cfg.heldout_len)
    if limit < 4 * cfg.seq_len or heldout_count < 1:
        raise DashskipError(
            f"training text has {corpus.numel()} tokens; too few for {cfg.seq_len}-token training windows plus a "
            f"{cfg.heldout_fraction:.0%} held-out tail of {cfg.heldout_len}-token windows; give more text"
        )

    def episode(step: int, decider: PolicyDecider) -> Episode:
        ids = _batch(corpus, cfg, step, limit)
        logits_full = bb.logits(engine.step(ids, engine.new_session(*ids.shape)).hidden)
        run = engine.step(ids, engine.new_session(*ids.shape), decider)
        logits = bb.logits(run.hidden)
        nll_full, nll_skip = token_nll(logits_full, ids), token_nll(logits, ids)
        states = run.states[:, :-1].long()  # the last token has no next token to be rewarded on
        ppl_full, ppl_policy = round(math.exp(float(nll_full.mean())), 3), round(math.exp(float(nll_skip.mean())), 3)
        log = {
            "ppl_full": ppl_full,
            "ppl_policy": ppl_policy,
            "state_fractions": {s.name: round(float((states == s.code).float().mean()), 4) for s in registered()},
            "ppl_gap": round(ppl_policy - ppl_full, 3),
        }
        if cfg.reward == "fidelity":  # the KL needs the full vocabulary's softmax twice: only when it is the reward
            kl = token_kl(logits_full, logits)
            log["kl"] = round(float(kl.mean()), 5)
            r_acc = fidelity_reward(kl, cfg.eps, cfg.reward_floor)
        else:
            r_acc = lm_accuracy_reward(nll_full, nll_skip, cfg.eps, cfg.reward_floor)
        return Episode(states, r_acc, None, log)

    model = _optimize(engine, costs, cfg, out, meta, progress, episode, show="ppl_gap")
    content = cfg.heldout_len - (cfg.bos_token_id is not None)
    heldout = with_bos(corpus[limit : limit + heldout_count * content].view(heldout_count, content), cfg.bos_token_id)
    return _finish(model, engine, costs, cfg, out, meta, heldout, None, progress)


@dataclass
class Episode:
    """One batch of sampled paths and what they earned: states (B, T, L), r_acc (B, T), mask (B, T) or None."""

    states: torch.Tensor
    r_acc: torch.Tensor
    mask: torch.Tensor | None
    log: dict[str, Any]


def _optimize(engine, costs: CostTable, cfg: TrainConfig, out: Path, meta, progress, episode, show: str):
    """The loop both rewards share: sample paths, reward them (eq. 12-16), REINFORCE, adapt beta, log, checkpoint."""
    torch.manual_seed(cfg.seed)
    bb = engine.backbone
    model = ScoringModel(PolicyConfig(bb.config.hidden_size, bb.num_layers, mode=cfg.mode, **cfg.policy))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start, beta = _resume(out, cfg, meta["fingerprint"], model, opt)
    cost_vec = torch.tensor([costs.cost(c) for c in model.config.codes.tolist()])
    efficiency = efficiency_values(cfg.efficiency, costs)
    log_path = out / "train_log.jsonl"
    truncate_log(log_path, start)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="training policy", disable=not progress)
    for step in bar:
        temp = temperature(step, cfg.tau0, cfg.tau_decay)
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        decider = PolicyDecider(
            model, engine.scales, cost_vec, mode=cfg.mode, temperature=temp, generator=gen, record=True
        )
        ep = episode(step, decider)
        rewards = decision_rewards(ep.states, ep.r_acc, beta, efficiency)
        loss = reinforce_loss(decider.records, rewards, temp, model, ep.mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ep.mask is None:
            ratio, reward = costs.compute_ratio(ep.states), float(rewards.mean())
        else:
            ratio = costs.compute_ratio(ep.states[ep.mask.bool()])
            reward = float((rewards.mean(-1) * ep.mask).sum() / ep.mask.sum())
        target = ratio_target_at(step, cfg)
        beta = _update_beta(beta, ratio, target, cfg)
        entry = {
            "step": step + 1,
            "beta": round(beta, 6),
            "loss": round(float(loss.detach()), 5),
            "reward": round(reward, 5),
            "temperature": round(temp, 4),
            "compute_ratio": round(ratio, 4),
            "ratio_target": None if target is None else round(target, 4),
            **ep.log,
        }
        with log_path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        bar.set_postfix(reward=entry["reward"], ratio=entry["compute_ratio"], **{show: entry[show]})
        _checkpoint(out, step + 1, model, opt, cfg, meta, beta)
    return model


def _finish(model, engine, costs, cfg, out: Path, meta, heldout, heldout_mask, progress) -> DashPolicy:
    """Wrap the trained model in a policy, calibrate its operating points on held-out data, save it."""
    model.eval()
    policy = DashPolicy(
        model,
        {
            **meta,
            "scales": engine.scales.tolist(),
            "cost_table": {str(k): v for k, v in costs.decode.items()},
            "cost_table_measured": costs.measured,
            "cost_table_machine": costs.machine,
            "kv_rule": str(engine.kv_rule),
            "train_config": asdict(cfg),
        },
    )
    calibrate_operating_points(policy, engine, heldout, cfg.targets, costs, progress, heldout_mask, cfg.max_ppl_loss)
    policy.save(out / "policy.safetensors")
    return policy


def _checkpoint(out: Path, step: int, model, opt, cfg: TrainConfig, meta, beta: float) -> None:
    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        state = {
            "step": step,
            "model": model.state_dict(),
            "optim": opt.state_dict(),
            "config": asdict(cfg),
            "fingerprint": meta["fingerprint"],
            "beta": beta,
        }
        atomic_torch_save(state, out / "checkpoint.pt")


def ratio_target_at(step: int, cfg: TrainConfig) -> float | None:
    """The compute ratio the sampled paths are held at once step `step` (0-based) is done: ratio_target, reached
    linearly from 1.0 over the first ratio_ramp of the steps."""
    if cfg.ratio_target is None or cfg.ratio_ramp <= 0:
        return cfg.ratio_target
    progress = min(1.0, (step + 1) / (cfg.ratio_ramp * cfg.steps))
    return 1.0 + (cfg.ratio_target - 1.0) * progress


def _update_beta(beta: float, ratio: float, target: float | None, cfg: TrainConfig) -> float:
    if target is None:
        return beta
    step_size = cfg.beta_rate * (target - ratio) / target
    return min(max(beta * math.exp(step_size), cfg.beta_min), cfg.beta_max)


def _train_choice(engine, questions, costs, cfg, out: Path, meta, progress) -> DashPolicy:
    """The classification-reward loop (eq. 12): one episode = every token of every choice of a question."""
    limit = int(len(questions) * (1 - cfg.heldout_fraction))
    if limit < cfg.batch_size or len(questions) - limit < 1:
        raise DashskipError(
            f"{len(questions)} questions are too few for batches of {cfg.batch_size} plus a held-out set"
        )
    bb = engine.backbone

    def episode(step: int, decider: PolicyDecider) -> Episode:
        rng = random.Random(cfg.seed * 1_000_003 + step)
        batch = [questions[rng.randrange(limit)] for _ in range(cfg.batch_size)]
        ids, attention, continuation, owner = choice_batch(batch)
        run = engine.step(ids, engine.new_session(*ids.shape), decider, attention)
        correct = choice_correct(bb.logits(run.hidden), ids, continuation, owner, batch)
        r_acc = classification_reward(correct)[:, None].expand(ids.shape)
        log = {"accuracy": round(float(correct.float().mean()), 4)}
        return Episode(run.states.long(), r_acc, attention.float(), log)

    model = _optimize(engine, costs, cfg, out, meta, progress, episode, show="accuracy")
    ids, attention, _, _ = choice_batch(questions[limit:][: 4 * cfg.heldout_windows])  # 48 questions by default
    return _finish(model, engine, costs, cfg, out, meta, ids, attention, progress)


def _resume(out: Path, cfg: TrainConfig, fingerprint: str, model, opt) -> tuple[int, float]:
    path = out / "checkpoint.pt"
    if not path.exists():
        return 0, cfg.beta
    try:
        ckpt = torch.load(path, weights_only=False)
    except Exception as exc:  # a damaged checkpoint must not silently restart from zero
        raise DashskipError(f"checkpoint '{path}' is unreadable ({exc}); delete it to start over") from None
    # Settings that do not change the trained weights may differ on resume (more steps, other operating points).
    free = {"steps", "heldout_windows", "heldout_len", "targets", "checkpoint_every", "max_ppl_loss"}
    if cfg.ratio_ramp > 0:
        free.discard("steps")  # the ramp's length is a fraction of the steps: more steps would move its targets
    # Settings added after a checkpoint was written count as their defaults (what that run trained with).
    saved = {**asdict(TrainConfig()), **ckpt["config"]}
    saved = {k: v for k, v in saved.items() if k not in free}
    now = {k: v for k, v in asdict(cfg).items() if k not in free}
    if (
        json.dumps(saved, sort_keys=True, default=list) != json.dumps(now, sort_keys=True, default=list)
        or ckpt.get("fingerprint") != fingerprint
    ):
        raise DashskipError(
            f"'{out}' holds a checkpoint of a different training run (other model or settings); "
            "use another --out folder or delete the checkpoint"
        )
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    return int(ckpt["step"]), float(ckpt["beta"])


@torch.no_grad()
def measure_ratio(
    policy: DashPolicy, engine: Engine, ids: torch.Tensor, bias: float, costs: CostTable, mask=None
) -> float:
    return ratio_and_nll(policy, engine, ids, bias, costs, mask)[0]


@torch.no_grad()
def ratio_and_nll(
    policy: DashPolicy | None, engine: Engine, ids: torch.Tensor, bias: float, costs: CostTable, mask=None
) -> tuple[float, float]:
    """Compute ratio and mean next-token NLL of the windows at a cost bias (no policy: every layer in full)."""
    ratio, nll, _ = ratio_nll_states(policy, engine, ids, bias, costs, mask)
    return ratio, nll


@torch.no_grad()
def ratio_nll_states(
    policy: DashPolicy | None, engine: Engine, ids: torch.Tensor, bias: float, costs: CostTable, mask=None
) -> tuple[float, float, dict[int, float]]:
    """`ratio_and_nll`, and the share of the windows' token-layers run in each state (code -> fraction)."""
    decider = None if policy is None else PolicyDecider(policy.model, engine.scales, policy.costs(), bias)
    result = engine.step(ids, engine.new_session(*ids.shape), decider, mask)
    states = result.states if mask is None else result.states[mask.bool()]
    nll = token_nll(engine.backbone.logits(result.hidden), ids)
    counted = torch.ones_like(nll) if mask is None else mask[:, 1:].to(nll.dtype)
    fractions = {int(c): float((states == c).float().mean()) for c in torch.unique(states).tolist()}
    return costs.compute_ratio(states), float((nll * counted).sum() / counted.sum()), fractions


def calibrate_operating_points(
    policy: DashPolicy,
    engine: Engine,
    heldout: torch.Tensor,
    targets,
    costs: CostTable,
    progress: bool = True,
    mask: torch.Tensor | None = None,
    max_ppl_loss: float | None = None,
) -> None:
    """Find, by bisection on held-out text, the cost bias that delivers each target compute ratio. With
    `max_ppl_loss`, the curve ends below the first ratio whose held-out perplexity is more than that fraction above
    the full model's, and targets beyond are dropped: a policy is only offered where it keeps its quality."""
    nlls: dict[float, float] = {}
    states: dict[float, dict[int, float]] = {}

    def ratio(bias: float) -> float:
        ratio, nlls[bias], states[bias] = ratio_nll_states(policy, engine, heldout, bias, costs, mask)
        return ratio

    # One bracket from all-full (ratio 1.0) to past the highest target, so the curve spans every point asked.
    curve = OperatingCurve.calibrate(ratio, targets, rising=True, start=(-1.0, 1.0), steps=14,
                                     cover=(1.0 + 1e-3, max(targets) * 1.05), limit=1e4,
                                     progress=progress)  # fmt: skip
    curve.states = states  # what each bias ran: its ratio on another host's table (`OperatingCurve.on`)
    if max_ppl_loss is not None:
        full = ratio_and_nll(None, engine, heldout, 0.0, costs, mask)[1]
        limit = full + math.log1p(max_ppl_loss)
        by_ratio = sorted(curve.tried, key=curve.tried.get)
        kept = list(itertools.takewhile(lambda b: nlls[b] <= limit, by_ratio)) or by_ratio[:1]
        curve = curve.keep(kept)
        policy.meta["quality_limit"] = {"max_ppl_loss": max_ppl_loss, "full_ppl": round(math.exp(full), 3),
                                        "top_ratio": round(curve.reach, 4),
                                        "top_ppl": round(math.exp(nlls[kept[-1]]), 3)}  # fmt: skip
    curve.write(policy.meta, "operating_points")


TRAIN_SPLIT = {"wikitext2": "wikitext2-valid"}  # train on validation text; the test split stays for evaluation


def train_job(
    model: str,
    out: str | Path,
    cfg: TrainConfig,
    data: str = "wikitext2",
    data_dir: str | Path | None = None,
    calibration: str | Path | None = None,
    progress: bool = True,
) -> DashPolicy:
    """`dashskip train`: load the model, calibrate it into the run folder unless given a calibration, use this
    machine's cost table (measured now if there is none), tokenize the training data and train; re-running the
    same job resumes from its checkpoint."""
    from dashskip.data import CHOICE_TASKS, leading_bos, load_choice_questions, load_text, token_windows
    from dashskip.measure.calibration import Calibration, calibrate
    from dashskip.measure.profiling import cost_table_for
    from dashskip.models.backbone import Backbone
    from dashskip.models.loading import fingerprint, load_model

    cfg.check()  # a mistyped setting is refused before minutes of loading and calibrating
    hf, tok = load_model(model)
    fp = fingerprint(hf)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    choice = data in CHOICE_TASKS
    text = None if choice else load_text(TRAIN_SPLIT.get(data, data), data_dir)
    if calibration is None:
        calibration = out / "calibration.json"
        if not calibration.exists():
            windows = token_windows(tok, text or load_text("wikitext2-valid", data_dir), 64, 256, cfg.seed)
            calibrate(hf, windows, fp, progress=progress, meta={"model": model, "data": data}).save(calibration)
    cal = Calibration.load(calibration)
    cal.check(fp)
    engine = Engine(Backbone(hf), cal.scales, cfg.kv_rule)
    costs = cost_table_for(engine, fp, progress)
    cfg.bos_token_id = leading_bos(tok)
    if choice:
        prefix = [] if cfg.bos_token_id is None else [cfg.bos_token_id]
        corpus: torch.Tensor | list[ChoiceQuestion] = [
            ChoiceQuestion(
                prefix + tok(p, add_special_tokens=False)["input_ids"],
                [tok(c, add_special_tokens=False)["input_ids"] for c in cs],
                answer,
            )
            for p, cs, answer in load_choice_questions(data, data_dir)
        ]
    else:
        corpus = text_ids(tok, text)
    t0 = time.perf_counter()
    policy = train(engine, corpus, costs, cfg, out, {"fingerprint": fp, "model": model, "data": data}, progress)
    policy.meta["train_seconds"] = round(time.perf_counter() - t0, 1)
    policy.save(out / "policy.safetensors")
    return policy
