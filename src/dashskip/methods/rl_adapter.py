"""The RL-adapter layer-skipping baseline (papers/rl-adapter-skip-paper.txt), run in dashskip's engine.

How the paper is read where its text is ambiguous or garbled (docs/rl_adapter.md says why):

- Eq. 5-6, h_i = Adapter_i(h_{i-1}) + m_i * Trans_i(h_{i-1}): `m_i` switches off the layer's residual *branch*;
  the identity path stays (section 3.4: a skipped layer passes the previous layer's hidden state on). A run layer
  outputs layer_i(x) + A_i(x) (the transformers layer includes its residual), a skipped one x + A_i(x)
  (scale_i * x + A_i(x) if the engine is given skip scales; this baseline is trained and run without them, as
  the paper has none).
- The adapter is a bottleneck MLP, A_i(x) = W2 GELU(W1 rms(x) + b1) + b2. It reads the RMS-normalised residual
  stream: raw hidden-state norms differ by orders of magnitude across layers. W2 and b2 start at zero, as LoRA's
  second matrix does ("just like LoRA"), so an untrained adapter leaves the model unchanged.
- Eq. 10, the controller: p(skip layer i+1) = sigmoid(w3 . GELU(A_i(x_i)) + b3), on the adapter of layer i,
  which reads the input x_i of layer i. The decision for layer i+1 is therefore ready when layer i is
  ("Adapter_{i-1} decides layer i"). The first and last layer are never skipped, so heads exist for layers
  0..L-3 only. Inference: layer i+1 is skipped when p exceeds a threshold (a logit threshold here), batch-level:
  when more than half of the batch votes skip (`decisions.BatchMajority`); at batch 1 that is per token.
- Training, backbone frozen throughout (the paper's optional backbone/LoRA updates and its stage 4 are left out):
  (1) adapter initialisation: language-model cross-entropy of the full path, adapters only;
  (2) layer-skip pretraining (eq. 7-9): two student passes, each with a Bernoulli(skip_prob) mask per sequence and
      layer, and a teacher pass of the same model without skipping (no gradient);
      L = alpha * (KL(P0||P1) + KL(P0||P2) + KL(P1||P2)) + ce_weight * (CE_1 + CE_2) / 2;
  (3) REINFORCE of the controllers (adapters and heads): each token samples its own path, reward (eq. 11)
      R = -CE(next token) - lam * (#inner layers run); advantage = R + CE_full(token) - batch mean, i.e. the
      full path's CE of the same token as a per-token baseline (independent of the actions, so unbiased) plus
      the batch mean. The similarity bonus: a layer whose output has cosine > `similarity` with its input is
      "similar"; when the M layers before layer i+1 are all similar, t = `bonus` is added to its skip
      probability. M starts at 3 and steps down to 0 (no bonus) over the first `bonus_fraction` of stage 3.
      log-probabilities are those of the distribution actually sampled (p + bonus), so the gradient is on-policy.
- K/V of skipped tokens: the engine's rule, `project` by default (as DASH); the paper's rule is `copy`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from dashskip.core.cache import KVRule
from dashskip.core.context import Rows, StateChoice, StepContext
from dashskip.core.costs import CostTable
from dashskip.core.decisions import BatchMajority, Decider, StepInfo
from dashskip.core.files import atomic_torch_save, load_artifact, load_weights, save_artifact, truncate_log
from dashskip.core.losses import token_nll
from dashskip.core.operating import OperatingCurve
from dashskip.core.states import State
from dashskip.data import load_text, token_windows
from dashskip.errors import DashskipError
from dashskip.measure.profiling import default_profile_path
from dashskip.models.backbone import Backbone
from dashskip.models.loading import fingerprint, load_model
from dashskip.runtime.engine import Engine

RMS_EPS = 1e-6
PROB_EPS = 1e-6
FORMAT = "dashskip-rl-adapter"
VERSION = 1


@dataclass
class AdapterConfig:
    hidden_size: int
    num_layers: int
    bottleneck: int = 64


class AdapterBank(nn.Module):
    """One adapter per layer and one controller head per decidable layer (the heads of layers 0..L-3)."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        d, r, n = config.hidden_size, config.bottleneck, config.num_layers
        self.down = nn.ModuleList(nn.Linear(d, r) for _ in range(n))
        self.up = nn.ModuleList(nn.Linear(r, d) for _ in range(n))
        self.heads = nn.ModuleList(nn.Linear(d, 1) for _ in range(max(n - 2, 0)))
        with torch.no_grad():
            for up in self.up:
                up.weight.zero_()
                up.bias.zero_()

    def forward(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(A_i(x) in x's dtype, skip logit of layer i+1 or None where layer i+1 is never skipped)."""
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=RMS_EPS)
        delta = self.up[i](F.gelu(self.down[i](h)))
        logit = self.heads[i](F.gelu(delta)).squeeze(-1) if i < len(self.heads) else None
        return delta.to(x.dtype), logit


class AdapterEngine(Engine):
    """The engine with an adapter summed onto every layer's output, run or skipped.

    Running a layer's adapter also yields the controller's skip logit for the next layer (`skip_logit`, shape
    (batch, tokens)), which `ControllerVotes` reads when the engine asks for that layer's state.
    """

    def __init__(
        self,
        backbone: Backbone,
        bank: AdapterBank,
        scales: torch.Tensor | None = None,
        kv_rule: str | KVRule = "project",
    ) -> None:
        super().__init__(backbone, scales, kv_rule)
        cfg = bank.config
        if (cfg.num_layers, cfg.hidden_size) != (backbone.num_layers, backbone.config.hidden_size):
            raise DashskipError(
                f"adapters for {cfg.num_layers} layers of width {cfg.hidden_size} cannot run on a model with "
                f"{backbone.num_layers} layers of width {backbone.config.hidden_size}; train adapters for this model"
            )
        self.bank = bank
        self.skip_logit: torch.Tensor | None = None
        self.track_grad = False

    @contextmanager
    def tracking_grad(self) -> Iterator[None]:
        """Let gradients reach the adapters through every layer (`Engine.step` itself runs under no_grad)."""
        self.track_grad = True
        try:
            yield
        finally:
            self.track_grad = False

    def run_layer(
        self, i: int, rows: Rows, x: torch.Tensor, step: StepContext, scale: torch.Tensor, plan=None
    ) -> torch.Tensor:
        with torch.set_grad_enabled(self.track_grad):
            delta, self.skip_logit = self.bank(i, x)
            return super().run_layer(i, rows, x, step, scale, plan) + delta


class ControllerVotes(Decider):
    """Each token's vote: skip layer i when the controller of layer i-1 gives a logit above `threshold`.

    Wrap it in `BatchMajority` for the paper's batch-level skipping (`RLAdapter.decider` does).
    """

    def __init__(self, engine: AdapterEngine, threshold: float) -> None:
        self.engine, self.threshold = engine, threshold
        self.last = engine.backbone.num_layers - 1

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        if layer in (0, self.last):
            return int(State.FULL)
        votes = self.engine.skip_logit > self.threshold
        if votes.numel() == 1:  # batch 1 decode: a plain int keeps the engine on its uniform fast path
            return int(State.SKIP) if bool(votes) else int(State.FULL)
        return torch.where(votes, int(State.SKIP), int(State.FULL))


@dataclass
class Vote:
    """One sampled decision batch of stage 3, to recompute its log-probability with gradients."""

    layer: int  # the layer decided; its controller is that of layer - 1
    hidden: torch.Tensor  # input of layer - 1, (batch, tokens, hidden)
    skip: torch.Tensor  # (batch, tokens) bool
    bonus: torch.Tensor  # (batch, tokens) added to the skip probability when sampling


class SampledVotes(Decider):
    """Stage-3 rollouts: every token samples its own path from its controllers (no batch majority), with the
    similarity bonus of the paper's sampling strategy 2."""

    def __init__(
        self, engine: AdapterEngine, generator: torch.Generator, bonus: float, similarity: float, run: int
    ) -> None:
        self.engine, self.generator = engine, generator
        self.bonus, self.similarity, self.run = bonus, similarity, run
        self.last = engine.backbone.num_layers - 1
        self.votes: list[Vote] = []
        self.previous: torch.Tensor | None = None
        self.similar_run: torch.Tensor | None = None

    def begin(self, step: StepInfo) -> None:
        self.votes, self.previous, self.similar_run = [], None, None

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        before, self.previous = self.previous, hidden
        if before is None:
            self.similar_run = torch.zeros(hidden.shape[:2], dtype=torch.long)
            return int(State.FULL)
        # layer - 1 is "similar" when its output (this layer's input) barely turned away from its input
        similar = F.cosine_similarity(hidden.float(), before.float(), dim=-1) > self.similarity
        self.similar_run = torch.where(similar, self.similar_run + 1, 0)
        if layer == self.last:
            return int(State.FULL)
        bonus = self.bonus * (self.similar_run >= self.run).float() if self.run > 0 else torch.zeros(hidden.shape[:2])
        prob = (torch.sigmoid(self.engine.skip_logit) + bonus).clamp(PROB_EPS, 1 - PROB_EPS)
        skip = torch.bernoulli(prob, generator=self.generator).bool()
        self.votes.append(Vote(layer, before, skip, bonus))
        return torch.where(skip, int(State.SKIP), int(State.FULL))


class RowMask(Decider):
    """Stage-2 students: a fixed skip mask per sequence and layer, (batch, layers) bool."""

    def __init__(self, skip: torch.Tensor) -> None:
        self.skip = skip

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        return torch.where(self.skip[:, layer, None], int(State.SKIP), int(State.FULL)).expand(hidden.shape[:2])


def max_speedup(costs: CostTable, num_layers: int) -> float:
    """The compute ratio with every inner layer skipped: the most any threshold can reach."""
    return costs.compute_ratio(
        torch.tensor([int(State.FULL)] + [int(State.SKIP)] * (num_layers - 2) + [int(State.FULL)])
    )


@dataclass
class RLAdapter:
    """Trained adapters and controllers plus what is needed to use them safely on their model."""

    bank: AdapterBank
    meta: dict[str, Any] = field(default_factory=dict)

    def check(self, fingerprint: str) -> None:
        if self.meta.get("fingerprint") != fingerprint:
            raise DashskipError(
                f"RL adapters were trained on another model (fingerprint {self.meta.get('fingerprint')}, this model "
                f"{fingerprint}); train adapters for this model with `dashskip train-rl-adapter --model ...`"
            )

    def engine(self, model: Any) -> AdapterEngine:
        """An engine running these adapters on `model` (a transformers model or a `Backbone`), after the check."""
        backbone = model if isinstance(model, Backbone) else Backbone(model)
        self.check(fingerprint(backbone.model))
        return AdapterEngine(backbone, self.bank, kv_rule=self.meta["kv_rule"])

    def costs(self) -> CostTable:
        table = {int(k): float(v) for k, v in self.meta["cost_table"].items()}
        return CostTable(table, table)

    def max_speedup(self) -> float:
        return max_speedup(self.costs(), self.bank.config.num_layers)

    def threshold_for(self, speedup: float) -> float:
        """Logit threshold that delivers `speedup` (compute ratio), from the held-out calibration."""
        top = self.max_speedup()
        if speedup > top + 1e-9:
            raise DashskipError(
                f"the RL-adapter baseline reaches compute ratios up to {top:.2f} on this model and cost table (every "
                f"inner layer skipped); {speedup} is out of reach"
            )
        curve = OperatingCurve.from_meta(self.meta, "thresholds")
        return curve.knob_for(speedup, "these thresholds", f"calibrate {speedup} with RLAdapter.calibrate(engine, "
                              f"heldout, costs, targets=[{speedup}])")  # fmt: skip

    def decider(self, engine: AdapterEngine, speedup: float) -> Decider:
        """Batch-majority controller votes at the threshold calibrated for `speedup`; 1.0 runs every layer."""
        if engine.bank is not self.bank:
            raise DashskipError("this engine runs other adapters; build it with RLAdapter.engine(model)")
        if speedup == 1.0:
            return Decider()
        return BatchMajority(ControllerVotes(engine, self.threshold_for(speedup)))

    @torch.no_grad()
    def measure_ratio(
        self, engine: AdapterEngine, windows: torch.Tensor, threshold: float, costs: CostTable, batch_size: int = 1
    ) -> float:
        decider = BatchMajority(ControllerVotes(engine, threshold))
        states = []
        for chunk in windows.split(batch_size):
            states.append(engine.step(chunk, engine.new_session(*chunk.shape), decider).states)
        return costs.compute_ratio(torch.cat(states))

    def calibrate(
        self,
        engine: AdapterEngine,
        heldout: torch.Tensor,
        costs: CostTable,
        targets: tuple[float, ...],
        batch_size: int = 1,
        progress: bool = True,
    ) -> None:
        """Find, by bisection on held-out windows run `batch_size` at a time, the logit threshold of each target.

        The batch size matters: majority votes over more rows skip differently than per-token votes.
        """
        top = max_speedup(costs, self.bank.config.num_layers)
        if any(not 1.0 <= t <= top for t in targets):
            raise DashskipError(
                f"operating points must lie in [1.0, {top:.2f}] (every inner layer skipped) on this model and cost "
                f"table; got {list(targets)}"
            )
        curve = OperatingCurve.calibrate(
            lambda z: self.measure_ratio(engine, heldout, z, costs, batch_size), targets, rising=False,
            start=(-8.0, 8.0), steps=24, progress=progress, desc="thresholds",
        )  # fmt: skip
        self.meta["cost_table"] = {str(k): v for k, v in costs.decode.items()}
        curve.write(self.meta, "thresholds")
        self.meta["calibration"] = {"windows": int(heldout.shape[0]), "tokens": heldout.shape[1], "batch": batch_size}

    def save(self, path: str | Path) -> None:
        save_artifact(
            path,
            self.bank,
            {**self.meta, "format": FORMAT, "version": VERSION, "adapter_config": asdict(self.bank.config)},
        )

    @classmethod
    def load(cls, path: str | Path) -> RLAdapter:
        remedy = "train adapters with `dashskip train-rl-adapter`"
        tensors, meta = load_artifact(path, "RL-adapter", FORMAT, VERSION, remedy)
        bank = AdapterBank(AdapterConfig(**meta.pop("adapter_config")))
        load_weights(bank, tensors, "RL-adapter", path)
        return cls(bank, meta)


@dataclass
class RLAdapterConfig:
    """Training settings, sized for a 2-core CPU (the paper's are for V100s; its learning rates are for a 7B model)."""

    bottleneck: int = 64
    batch_size: int = 4
    seed: int = 0
    kv_rule: str = "project"
    # stage 1: adapter initialisation
    init_steps: int = 50
    init_lr: float = 1e-3
    # stage 2: layer-skip pretraining
    pretrain_steps: int = 150
    pretrain_lr: float = 5e-4
    skip_prob: float = 0.3  # P(m_i = 0) per sequence and inner layer; also the controllers' initial skip probability
    alpha: float = 1.0  # weight of the KL terms (eq. 9)
    ce_weight: float = 1.0  # weight of the students' cross-entropy; 0 = pure distillation
    # stage 3: REINFORCE
    rl_steps: int = 300
    rl_lr: float = 1e-3  # the heads
    rl_adapter_lr: float = 1e-4  # the adapters, which the paper trains with the heads here; 0 freezes them
    lam: float = 0.05  # lambda of eq. 11: reward lost per inner layer run (nats of the next token's CE)
    bonus: float = 0.1  # t, added to the skip probability after M similar layers
    similarity: float = 0.97  # tau: cosine(input, output) above which a layer counts as similar
    bonus_layers: int = 3  # M at the start of stage 3
    bonus_fraction: float = 0.3  # share of stage 3 over which M steps down to 0
    checkpoint_every: int = 20
    heldout_windows: int = 8  # windows held out of `windows` for the thresholds when no held-out set is given
    calibration_batch: int = 1  # batch size the thresholds are calibrated at (1: per-token votes)
    targets: tuple[float, ...] = (1.33, 1.67, 2.0)

    def check(self) -> None:
        steps = (self.init_steps, self.pretrain_steps, self.rl_steps)
        if min(steps) < 0 or sum(steps) < 1 or self.batch_size < 1 or self.bottleneck < 1:
            raise DashskipError("need stage steps >= 0 (at least one in all), batch size >= 1 and bottleneck >= 1")
        if not 0.0 < self.skip_prob < 1.0 or self.bonus_layers < 0 or not 0.0 <= self.bonus_fraction <= 1.0:
            raise DashskipError("need 0 < skip_prob < 1, bonus_layers >= 0 and 0 <= bonus_fraction <= 1")
        if self.checkpoint_every < 1 or self.calibration_batch < 1 or self.heldout_windows < 1:
            raise DashskipError("checkpoint interval, calibration batch and held-out windows must be >= 1")
        KVRule.parse(self.kv_rule)

    @property
    def total_steps(self) -> int:
        return self.init_steps + self.pretrain_steps + self.rl_steps

    def stage(self, step: int) -> str:
        if step < self.init_steps:
            return "init"
        return "pretrain" if step < self.init_steps + self.pretrain_steps else "rl"

    def run_length(self, step: int) -> int:
        """M at a (global) step of stage 3: bonus_layers, stepping down to 0 over the first bonus_fraction."""
        k = step - self.init_steps - self.pretrain_steps
        span = self.bonus_fraction * self.rl_steps
        if k >= span:
            return 0
        return self.bonus_layers - math.floor(self.bonus_layers * k / span)


def pretrain_loss(
    engine: AdapterEngine, ids: torch.Tensor, masks: torch.Tensor, cfg: RLAdapterConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-2 loss (eq. 7-9) of a batch: `masks` (2, batch, layers) bool are the two students' skipped layers."""
    bb = engine.backbone
    with torch.no_grad():
        teacher = F.log_softmax(bb.logits(engine.step(ids, engine.new_session(*ids.shape)).hidden).float(), -1)
    students = []
    for mask in masks:
        with engine.tracking_grad():
            hidden = engine.step(ids, engine.new_session(*ids.shape), RowMask(mask)).hidden
        students.append(F.log_softmax(bb.logits(hidden).float(), -1))

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # KL(P || Q) per position, averaged
        return F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean()

    distill = kl(teacher, students[0]) + kl(teacher, students[1])
    reg = kl(students[0], students[1])
    ce = (token_nll(students[0], ids).mean() + token_nll(students[1], ids).mean()) / 2
    loss = cfg.alpha * (distill + reg) + cfg.ce_weight * ce
    log = {"kl_distill": float(distill.detach()), "kl_reg": float(reg.detach()), "ce": float(ce.detach())}
    return loss, log


def init_loss(engine: AdapterEngine, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-1 loss: the full path's next-token cross-entropy, with gradients into the adapters."""
    with engine.tracking_grad():
        hidden = engine.step(ids, engine.new_session(*ids.shape)).hidden
    ce = token_nll(engine.backbone.logits(hidden), ids).mean()
    return ce, {"ce": float(ce.detach())}


def rl_loss(
    engine: AdapterEngine, ids: torch.Tensor, cfg: RLAdapterConfig, step: int, gen: torch.Generator, costs: CostTable
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage-3 loss: sample every token's path, reward it (eq. 11), REINFORCE (eq. 13)."""
    bb = engine.backbone
    run = cfg.run_length(step)
    sampler = SampledVotes(engine, gen, cfg.bonus, cfg.similarity, run)
    with torch.no_grad():
        nll_full = token_nll(bb.logits(engine.step(ids, engine.new_session(*ids.shape)).hidden), ids)
        result = engine.step(ids, engine.new_session(*ids.shape), sampler)
        nll = token_nll(bb.logits(result.hidden), ids)
    executed = (result.states[:, :-1, 1:-1] != State.SKIP).sum(-1).float()  # inner layers run, per scored token
    reward = -nll - cfg.lam * executed
    advantage = reward + nll_full
    advantage = advantage - advantage.mean()
    terms = []
    for vote in sampler.votes:
        _, logit = engine.bank(vote.layer - 1, vote.hidden)
        prob = (torch.sigmoid(logit) + vote.bonus).clamp(PROB_EPS, 1 - PROB_EPS)
        logp = torch.where(vote.skip, prob.log(), (-prob).log1p())[:, :-1]  # the last token has no reward
        terms.append((advantage * logp).mean())
    loss = -torch.stack(terms).mean()
    log = {
        "reward": float(reward.mean()),
        "ppl_full": math.exp(float(nll_full.mean())),
        "ppl_sampled": math.exp(float(nll.mean())),
        "skip_fraction": float((result.states[..., 1:-1] == State.SKIP).float().mean()),
        "compute_ratio": costs.compute_ratio(result.states),
        "bonus_run": run,
    }
    return loss, log


def _optimizer(bank: AdapterBank, stage: str, cfg: RLAdapterConfig) -> torch.optim.Optimizer:
    adapters = [*bank.down.parameters(), *bank.up.parameters()]
    if stage == "init":
        return torch.optim.AdamW(adapters, lr=cfg.init_lr)
    if stage == "pretrain":
        return torch.optim.AdamW(adapters, lr=cfg.pretrain_lr)
    return torch.optim.AdamW(
        [{"params": list(bank.heads.parameters())}, {"params": adapters, "lr": cfg.rl_adapter_lr}], lr=cfg.rl_lr
    )


def _resume(out: Path, cfg: RLAdapterConfig, fp: str, bank: AdapterBank) -> tuple[int, tuple[str, dict] | None]:
    path = out / "checkpoint.pt"
    if not path.exists():
        return 0, None
    try:
        ckpt = torch.load(path, weights_only=False)
    except Exception as exc:  # a damaged checkpoint must not silently restart from zero
        raise DashskipError(f"checkpoint '{path}' is unreadable ({exc}); delete it to start over") from None
    free = {"checkpoint_every", "targets", "calibration_batch", "heldout_windows"}  # do not change the weights
    saved = {k: v for k, v in ckpt["config"].items() if k not in free}
    now = {k: v for k, v in asdict(cfg).items() if k not in free}
    if saved != now or ckpt.get("fingerprint") != fp:
        raise DashskipError(
            f"'{out}' holds a checkpoint of a different RL-adapter run (other model or settings); "
            "use another output folder or delete the checkpoint"
        )
    bank.load_state_dict(ckpt["bank"])
    return int(ckpt["step"]), (ckpt["stage"], ckpt["optim"])


def _model_parts(dm_or_model: Any, costs: CostTable | None) -> tuple[Backbone, str, str, CostTable]:
    """Backbone, fingerprint, name and cost table of a `DashModel` (anything with a backbone, fingerprint and
    costs) or a transformers model."""
    if isinstance(getattr(dm_or_model, "backbone", None), Backbone):
        bb, fp, table = dm_or_model.backbone, dm_or_model.fingerprint, dm_or_model.costs
    else:
        bb = Backbone(dm_or_model)
        fp, table = fingerprint(dm_or_model), CostTable.default()
    return bb, fp, getattr(bb.model, "dashskip_name", bb.config.model_type), costs or table


def train_rl_adapter(
    dm_or_model: Any,
    windows: torch.Tensor,
    config: RLAdapterConfig,
    out_dir: str | Path,
    progress: bool = True,
    heldout: torch.Tensor | None = None,
    costs: CostTable | None = None,
) -> RLAdapter:
    """Train adapters and controllers in the paper's three stages; write checkpoints, a JSONL log and
    `rl_adapter.safetensors`, with thresholds calibrated on `heldout` (default: the last windows of `windows`).

    `windows` (N, T) token ids (e.g. from `data.token_windows`); each step draws `batch_size` of them as a
    function of (seed, step), so a run killed and started again with the same arguments resumes from its last
    checkpoint and ends exactly where the uninterrupted run would. `costs` default: the DashModel's table, or the
    METHOD.md approximations for a plain transformers model.
    """
    cfg = config
    cfg.check()
    bb, fp, name, costs = _model_parts(dm_or_model, costs)
    if bb.num_layers < 3:
        raise DashskipError(f"the model has {bb.num_layers} layers; skipping needs one besides the first and last")
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise DashskipError(f"training windows must be (count, tokens) with tokens >= 2, got {tuple(windows.shape)}")
    if heldout is None:
        windows, heldout = windows[: -cfg.heldout_windows], windows[-cfg.heldout_windows :]
    if windows.shape[0] < 1 or heldout.shape[0] < 1:
        raise DashskipError(
            f"too few windows: need training windows plus {cfg.heldout_windows} held out; give more windows"
        )
    top = max_speedup(costs, bb.num_layers)
    if any(not 1.0 <= t <= top for t in cfg.targets):
        raise DashskipError(
            f"operating points must lie in [1.0, {top:.2f}] (every inner layer skipped) on this model and cost "
            f"table; got {list(cfg.targets)}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bb.model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    bank = AdapterBank(AdapterConfig(bb.config.hidden_size, bb.num_layers, cfg.bottleneck))
    with torch.no_grad():
        for head in bank.heads:  # the first rollouts skip about as often as the pretraining masks did
            head.bias.fill_(math.log(cfg.skip_prob / (1 - cfg.skip_prob)))
    engine = AdapterEngine(bb, bank, kv_rule=cfg.kv_rule)
    start, saved_optim = _resume(out, cfg, fp, bank)
    log_path = out / "train_log.jsonl"
    truncate_log(log_path, start)
    opt, opt_stage = None, None
    inner = torch.zeros(bb.num_layers, dtype=torch.bool)
    inner[1:-1] = True
    bar = tqdm(range(start, cfg.total_steps), initial=start, total=cfg.total_steps, disable=not progress)
    for step in bar:
        stage = cfg.stage(step)
        if stage != opt_stage:
            opt, opt_stage = _optimizer(bank, stage, cfg), stage
            if saved_optim is not None and saved_optim[0] == stage:
                opt.load_state_dict(saved_optim[1])
            saved_optim = None
            bar.set_description(f"rl-adapter {stage}")
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        ids = windows[torch.randint(0, windows.shape[0], (cfg.batch_size,), generator=gen)]
        if stage == "init":
            loss, log = init_loss(engine, ids)
        elif stage == "pretrain":
            masks = (torch.rand(2, cfg.batch_size, bb.num_layers, generator=gen) < cfg.skip_prob) & inner
            loss, log = pretrain_loss(engine, ids, masks, cfg)
        else:
            loss, log = rl_loss(engine, ids, cfg, step, gen, costs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        entry = {"step": step + 1, "stage": stage, "loss": round(float(loss.detach()), 5)}
        entry |= {k: round(v, 5) if isinstance(v, float) else v for k, v in log.items()}
        with log_path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        bar.set_postfix(loss=entry["loss"])
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.total_steps:
            state = {"step": step + 1, "stage": stage, "bank": bank.state_dict(), "optim": opt.state_dict()}
            atomic_torch_save({**state, "config": asdict(cfg), "fingerprint": fp}, out / "checkpoint.pt")
    bar.close()
    bank.eval()
    meta = {"fingerprint": fp, "model": name, "kv_rule": str(engine.kv_rule), "train_config": asdict(cfg)}
    adapter = RLAdapter(bank, meta)
    adapter.calibrate(engine, heldout, costs, cfg.targets, cfg.calibration_batch, progress)
    adapter.save(out / "rl_adapter.safetensors")
    return adapter


def run_rl_adapter(
    model: str,
    out: Path,
    cfg: RLAdapterConfig,
    data: str = "wikitext2-valid",
    data_dir: str | Path | None = None,
    windows: int = 1000,
    seq_len: int = 128,
    heldout_len: int = 256,
) -> RLAdapter:
    """A full training run from a model name: windows from the first 90% of the text, thresholds calibrated on the
    last 10%, this machine's cost table if `dashskip profile` measured one (`dashskip train-rl-adapter`)."""
    cfg.check()
    hf, tokenizer = load_model(model)
    text = load_text(data, data_dir)
    cut = int(len(text) * 0.9)  # held-out thresholds on text never trained on
    train_windows = token_windows(tokenizer, text[:cut], windows, seq_len, seed=cfg.seed)
    heldout = token_windows(tokenizer, text[cut:], cfg.heldout_windows, heldout_len, seed=cfg.seed)
    fp = fingerprint(hf)
    profile = default_profile_path(fp, cfg.kv_rule)
    costs = CostTable.load(profile, fp) if profile.exists() else CostTable.default()
    t0 = time.perf_counter()
    adapter = train_rl_adapter(hf, train_windows, cfg, out, heldout=heldout, costs=costs)
    adapter.meta["train_seconds"] = round(time.perf_counter() - t0, 1)
    adapter.meta["cost_table_measured"] = costs.measured
    adapter.save(Path(out) / "rl_adapter.safetensors")
    return adapter
