"""The DASH scoring model, its decision function, and the policy file.

G(h, l_i, l_{i+1}, s_i)[s] = MLP([h ; E(l_i) ; E(l_{i+1})])[s] - alpha * |s - s_i|   (METHOD.md eq. 8-10)

One output per state the policy was built with (by name: skip, int4, int8, full; any registered state can be
one), s being the state's level (its bits / 4, METHOD.md's 0/1/2/4). At inference the decision is greedy
(eq. 18) on G - bias * c(s): the per-state cost bias is what turns one trained
policy into any operating point (1.33x, 1.67x, 2.0x, ...); its value per target
is found on held-out text after training and stored in the policy file.

Asynchronous mode (eq. 19-20) decides layer i+1 from scale_i * h_i, the input of
layer i, at the moment layer i starts; synchronous mode decides layer i+1 from
its real input h_{i+1}.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dashskip.core.context import StateChoice
from dashskip.core.costs import CostTable
from dashskip.core.decisions import Decider, Lookahead, StepInfo, Traits
from dashskip.core.files import load_artifact, load_weights, require, save_artifact
from dashskip.core.kernels import compiled_rows, extension
from dashskip.core.operating import OperatingCurve, OperatingPoint, Unit, resolve
from dashskip.core.states import State, by_name, code_lookup, parse, spec
from dashskip.errors import DashskipError
from dashskip.measure.profiling import wall_clock_table
from dashskip.methods.dash.control import GAIN, RateControl, SequenceState
from dashskip.runtime.engine import Engine

RMS_EPS = 1e-6
POLICY_FORMAT = "dashskip-policy"
POLICY_VERSION = 2
BUILTIN_STATES = ("skip", "int4", "int8", "full")  # version 1 files: outputs for codes 0, 1, 2, 4 in this order


@dataclass
class PolicyConfig:
    """Sizes of the scoring model. Defaults: d_l = 16, d1 = 256, d2 = 64 (608 -> 256 -> 64 -> 4 on SmolLM2)."""

    hidden_size: int
    num_layers: int
    layer_dim: int = 16
    hidden1: int = 256
    hidden2: int = 64
    change_penalty: float = 0.05  # alpha in eq. 8: penalty per unit of |s - s_i|
    mode: str = "async"  # or "sync"
    full_prior: float = 3.0  # initial score advantage of the full state (P(full) ~ 0.87 at temperature 1)
    # The scoring model's outputs, by state name; the file stores the names, so codes never leak into it.
    states: tuple[str, ...] = BUILTIN_STATES
    # States the policy may choose (names or codes); the others are masked out of its scores, in training and
    # inference alike.
    allowed: tuple[str | int, ...] = BUILTIN_STATES

    def __post_init__(self) -> None:
        if self.mode not in ("async", "sync"):
            raise DashskipError(f"decision mode must be 'async' or 'sync', got '{self.mode}'")
        self.states = tuple(spec(parse(s)).name for s in self.states)
        allowed = {spec(parse(s)).name for s in self.allowed}
        if not allowed <= set(self.states) or "full" not in allowed:
            raise DashskipError(
                f"allowed states must be among {', '.join(self.states)} and include full; got {sorted(allowed)}"
            )
        self.allowed = tuple(n for n in self.states if n in allowed)

    @property
    def codes(self) -> torch.Tensor:
        """Output index k <-> state code codes[k]."""
        return torch.tensor([by_name(n).code for n in self.states])

    @property
    def levels(self) -> torch.Tensor:
        """Each output's state level s (bits / 4): what the change penalty |s - s_i| measures."""
        return torch.tensor([by_name(n).level for n in self.states])

    def level_of(self, codes: torch.Tensor) -> torch.Tensor:
        return code_lookup({by_name(n).code: by_name(n).level for n in self.states})[codes.long()]

    def index_of(self, codes: torch.Tensor) -> torch.Tensor:
        """State codes -> output indices."""
        return code_lookup({by_name(n).code: float(k) for k, n in enumerate(self.states)}).long()[codes.long()]

    def state_mask(self) -> torch.Tensor:
        """0 for allowed states, a large negative score for the others (one per output index)."""
        return torch.tensor([0.0 if n in self.allowed else -1e9 for n in self.states])


class ScoringModel(nn.Module):
    """MLP over the (RMS-normalised) hidden state and two layer-position embeddings; one score per state."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        self.layer_embedding = nn.Embedding(config.num_layers, config.layer_dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size + 2 * config.layer_dim, config.hidden1),
            nn.GELU(),
            nn.Linear(config.hidden1, config.hidden2),
            nn.GELU(),
            nn.Linear(config.hidden2, len(config.states)),
        )
        with torch.no_grad():  # start close to the full model: sampling from a uniform policy is all noise
            self.mlp[-1].bias.copy_(torch.tensor([config.full_prior if n == "full" else 0.0 for n in config.states]))

    def forward(self, hidden: torch.Tensor, current: int, nxt: int, previous: torch.Tensor) -> torch.Tensor:
        """Scores (..., states) for the state of layer `nxt`, deciding from layer `current` in state `previous`."""
        # Hidden-state norms differ by orders of magnitude across layers; the decision should not.
        h = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=RMS_EPS)
        shape = h.shape[:-1]
        pos = self.layer_embedding(torch.tensor([current, nxt])).reshape(-1)
        x = torch.cat([h, pos.expand(*shape, pos.numel())], dim=-1)
        change = (self.config.levels - self.config.level_of(previous)[..., None]).abs()
        return self.mlp(x) - self.config.change_penalty * change + self.config.state_mask()


class GreedyScorer:
    """The scoring model folded for inference: what can be computed once is computed once.

    The layer embeddings only shift the first layer's bias, the change penalty and cost bias only shift the
    last one, and the RMS normalisation commutes with the first product (so it is a division after it, and the
    async scale `scale_i`, which it cancels, need not be applied). Per decision there remain three small
    products, a norm and two GELUs: at batch 1 their cost is per-op overhead, so few rows (any previous states,
    one cost bias or one per row) run them as one compiled call (`csrc/layer_ops.cpp`, ~10x cheaper), the rest as
    torch ops. It keeps no cost bias: each call takes a table (`table`), so sequences at different operating
    points share one scorer.
    """

    def __init__(self, model: ScoringModel, costs: torch.Tensor) -> None:
        cfg, first, middle, last = model.config, model.mlp[0], model.mlp[2], model.mlp[4]
        with torch.no_grad():
            d = cfg.hidden_size
            emb = model.layer_embedding.weight
            pairs = torch.cat([emb[:-1], emb[1:]], dim=1)  # row i: (E(i), E(i+1))
            # rms(h) = ||h|| / sqrt(d): fold sqrt(d) into the weight, divide by ||h|| after the product
            self.w1 = (first.weight[:, :d].t() * d**0.5).contiguous()
            self.b1 = list((first.bias + pairs @ first.weight[:, d:].t()).unbind(0))  # per layer, (hidden1,)
            self.w2, self.b2 = middle.weight.t().contiguous(), middle.bias.clone()
            self.w3 = last.weight.t().contiguous()
            levels = cfg.levels
            change = (levels[None, :] - levels[:, None]).abs()  # (previous index, state)
            self.b3_base = last.bias - cfg.change_penalty * change + cfg.state_mask()  # (previous, state)
        self.costs = costs
        self.dim = d
        self.config = cfg
        self.codes = cfg.codes
        self.code_list = self.codes.tolist()
        self.index = {code: k for k, code in enumerate(self.code_list)}

    def table(self, bias: float | torch.Tensor) -> torch.Tensor:
        """The last layer's bias at a cost bias: (previous state's index, state), or (rows, previous, state) for
        one cost bias per row. Its owner (a sequence, a step) keeps it; the scorer keeps no bias of its own."""
        bias = torch.as_tensor(bias, dtype=torch.float32)
        return (self.b3_base - bias[..., None, None] * self.costs).contiguous()

    def __call__(self, hidden: torch.Tensor, current: int, previous: StateChoice, table: torch.Tensor) -> StateChoice:
        """Chosen states for layer current+1 at the biases of `table` (`table()`), an int for one row (the
        engine's uniform fast path) or a tensor of the hidden state's (rows, tokens) shape; `hidden` unscaled
        or scaled alike.

        Few rows (one token each with a table per row, or any few with one table) are one compiled call, the
        kernel scoring each row on its own, so a row gets exactly what it gets alone. More rows of one token
        are one batched product (a GEMM, which may round a row otherwise than alone: docs/serving.md gives the
        measured rate). Rows of several tokens, each with its own table (a prefill of several requests), are
        scored row by row, each exactly as alone."""
        per_row = table.ndim == 3
        if per_row and hidden.shape[1] > 1 and table.shape[0] > 1:
            answers = []
            for r in range(table.shape[0]):
                row_previous = previous[r : r + 1] if isinstance(previous, torch.Tensor) else previous
                answers.append(self(hidden[r : r + 1], current, row_previous, table[r]))
            return torch.cat([torch.as_tensor(a).expand(1, hidden.shape[1]) for a in answers])
        flat = hidden.reshape(-1, self.dim)
        if not isinstance(previous, torch.Tensor) and not per_row:  # the common case: one row of the table
            b3 = table[self.index[previous]]
        else:
            if isinstance(previous, torch.Tensor):
                prev = self.config.index_of(previous.expand(hidden.shape[:-1]).reshape(-1))
            else:
                prev = torch.full((flat.shape[0],), self.index[previous])
            if per_row:  # one table per row, one token per row (or one row): each row's own biases
                b3 = table.expand(flat.shape[0], *table.shape[1:])[torch.arange(flat.shape[0]), prev]
            else:
                b3 = table[prev]
        if compiled_rows(flat):  # one call; b3 one row for all, or a row per row
            index = extension().decide(flat.contiguous(), self.w1, self.b1[current], self.w2, self.b2, self.w3,
                                       b3.contiguous(), RMS_EPS)  # fmt: skip
            return self.states(index, hidden.shape[:-1])
        flat = flat.float()
        norm = torch.linalg.vector_norm(flat, dim=-1, keepdim=True).clamp_(min=RMS_EPS)
        x = F.gelu(torch.addcdiv(self.b1[current], flat @ self.w1, norm))
        x = F.gelu(torch.addmm(self.b2, x, self.w2))
        return self.states(torch.addmm(b3, x, self.w3).argmax(-1), hidden.shape[:-1])

    def states(self, index: list[int] | torch.Tensor, shape: torch.Size) -> StateChoice:
        """Output indices as states: a plain int for one row keeps the engine on its uniform fast path."""
        if len(index) == 1:
            return self.code_list[int(index[0])]
        return self.codes[torch.as_tensor(index)].reshape(shape)


@dataclass
class Record:
    """One recorded decision batch, to recompute log-probabilities with gradients during training."""

    hidden: torch.Tensor
    current: int
    nxt: int
    previous: torch.Tensor
    index: torch.Tensor  # chosen output index, (batch, tokens)


class PolicyDecider(Lookahead):
    """Decides states with a scoring model: greedy (inference) or sampled at a temperature (training). One per
    sequence (a request), as the decider of that sequence's state (`SequenceState`: its operating point's bias and
    its rate controller); the scoring model itself is shared."""

    def __init__(
        self,
        model: ScoringModel,
        scales: torch.Tensor,
        costs: torch.Tensor,
        bias: float = 0.0,
        mode: str | None = None,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
        record: bool = False,
        control: RateControl | None = None,
        decisions: str | None = None,
    ) -> None:
        self.traits = Traits(decisions=decisions)  # where a cost table keeps what these decisions cost
        self.model = model
        self.scales = scales
        self.sequence = SequenceState(control) if control is not None else None  # None: the bias as it is
        self.cost_bias = bias * costs  # (states,), subtracted from the scores
        self.mode = mode or model.config.mode
        self.temperature = temperature
        self.generator = generator
        self.record = record
        self.records: list[Record] = []
        self.pending: StateChoice | None = None
        self.last = model.config.num_layers - 1
        self.greedy = GreedyScorer(model, costs) if temperature is None and not record else None
        self.table = self.greedy.table(bias) if self.greedy is not None else None  # this sequence's, this step
        self.scaled_input = self.greedy is None
        if control is not None and self.greedy is None:
            raise DashskipError("rate control steers greedy decisions; sampled or recorded ones train at a fixed bias")

    @property
    def control(self) -> RateControl | None:
        """Its sequence's rate controller (None: the calibrated bias as it is)."""
        return None if self.sequence is None else self.sequence.control

    def begin(self, step: StepInfo) -> None:
        self.pending = None
        if self.sequence is not None:
            bias = self.sequence.begin(step)  # (batch,): each row's own
            self.table = self.greedy.table(bias[0] if bool((bias == bias[0]).all()) else bias)

    def end(self, states: torch.Tensor) -> None:
        if self.sequence is not None:
            self.sequence.end(states)

    @classmethod
    def fuse(cls, rows: Sequence[Decider]) -> Decider | None:
        """Greedy deciders of one scoring model (requests of one policy at any operating points), as `PolicyRows`."""
        policies = [d for d in rows if isinstance(d, PolicyDecider)]
        lead = policies[0]
        same = all(d.greedy is not None and d.model is lead.model and d.mode == lead.mode for d in policies)
        known = all(isinstance(d, PolicyDecider) or type(d) is Decider for d in rows)
        return PolicyRows(rows) if same and known else None

    def again(self, states: torch.Tensor, valid: torch.Tensor | None) -> bool:
        return self.sequence is not None and self.sequence.again(states, valid)

    @torch.no_grad()
    def choose(self, hidden: torch.Tensor, current: int, nxt: int, previous: StateChoice) -> StateChoice:
        if self.greedy is not None:
            return self.greedy(hidden, current, previous, self.table)
        prev = previous if isinstance(previous, torch.Tensor) else torch.full(hidden.shape[:-1], previous)
        scores = self.model(hidden, current, nxt, prev) - self.cost_bias
        if self.temperature is None:
            index = scores.argmax(-1)
        else:
            probs = F.softmax(scores / self.temperature, dim=-1).reshape(-1, scores.shape[-1])
            index = torch.multinomial(probs, 1, generator=self.generator).reshape(scores.shape[:-1])
        if self.record:
            self.records.append(Record(hidden.detach().clone(), current, nxt, prev.clone(), index))
        return self.model.config.codes[index]



class ScoredStep(Lookahead):
    """One step's greedy decisions at a cost bias per row (`table`: `GreedyScorer.table` of the rows' biases):
    one scoring call per layer for every row of the step. Holds nothing past the step: what a sequence keeps
    (its controller, its bias) stays with the sequence."""

    def __init__(self, lead: PolicyDecider, table: torch.Tensor) -> None:
        self.traits, self.mode, self.last, self.scales = lead.traits, lead.mode, lead.last, lead.scales
        self.scorer, self.table = lead.greedy, table

    @torch.no_grad()
    def choose(self, hidden: torch.Tensor, current: int, nxt: int, previous: StateChoice) -> StateChoice:
        return self.scorer(hidden, current, previous, self.table)


class PolicyRows(ScoredStep):
    """The rows of one step, row r deciding as its own sequence's `PolicyDecider` would (its operating point, its
    controller) or in full (a plain `Decider`: a request at 1.0x), scored together (`ScoredStep`)."""

    def __init__(self, rows: Sequence[Decider]) -> None:
        self.lead = next(d for d in rows if isinstance(d, PolicyDecider))
        super().__init__(self.lead, self.lead.table)
        self.rows = list(rows)
        self.full = torch.tensor([not isinstance(d, PolicyDecider) for d in self.rows])

    def begin(self, step: StepInfo) -> None:
        self.pending = None
        for r, d in enumerate(self.rows):
            d.begin(step.rows(slice(r, r + 1)))
        self.table = torch.stack([(d if isinstance(d, PolicyDecider) else self.lead).table for d in self.rows])

    def end(self, states: torch.Tensor) -> None:
        for r, d in enumerate(self.rows):
            d.end(states[r : r + 1])

    @torch.no_grad()
    def choose(self, hidden: torch.Tensor, current: int, nxt: int, previous: StateChoice) -> StateChoice:
        answer = super().choose(hidden, current, nxt, previous)
        if not bool(self.full.any()):
            return answer
        return torch.where(self.full[:, None], int(State.FULL), torch.as_tensor(answer).expand(hidden.shape[:2]))


@dataclass
class DashPolicy:
    """A trained scoring model plus everything needed to use it safely on its model."""

    model: ScoringModel
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> PolicyConfig:
        return self.model.config

    def check(self, fingerprint: str) -> None:
        if self.meta.get("fingerprint") != fingerprint:
            raise DashskipError(
                f"policy was trained on another model (fingerprint {self.meta.get('fingerprint')}, this model "
                f"{fingerprint}); train one for this model with `dashskip train`"
            )

    def scales(self) -> torch.Tensor:
        return torch.tensor(self.meta["scales"], dtype=torch.float32)

    def costs(self) -> torch.Tensor:
        """The cost of each output's state in the table the operating points were calibrated with."""
        table = self.meta["cost_table"]
        return torch.tensor([float(table[str(c)]) for c in self.config.codes.tolist()])

    def cost_table(self) -> CostTable:
        """The table its operating points were calibrated with (decode and prefill alike)."""
        table = {int(k): float(v) for k, v in self.meta["cost_table"].items()}
        return CostTable(table, table)

    @property
    def curve(self) -> OperatingCurve:
        """The cost bias against the compute ratio it gave on held-out text (`training.calibrate_operating_points`)."""
        return OperatingCurve.from_meta(self.meta, "operating_points")

    def curve_on(self, costs: CostTable | None) -> OperatingCurve:
        """The curve with compute ratios on `costs` (None, or the table it was calibrated with: as calibrated)."""
        curve = self.curve
        if costs is None or costs.decode == self.cost_table().decode:
            return curve
        return curve.on(costs)

    def max_speedup(self, costs: CostTable | None = None) -> float:
        """The highest compute ratio it was calibrated to, on `costs` (default: its own table)."""
        return self.curve_on(costs).reach

    def bias_for(self, speedup: float, costs: CostTable | None = None) -> float:
        """Cost bias that delivers `speedup` (compute ratio on `costs`, default its own table), interpolated on
        the held-out ratio curve."""
        return self.curve_on(costs).knob_for(speedup, "this policy", "ask for less, or re-run `dashskip train` "
                                             "with a higher --speedup")  # fmt: skip

    @property
    def decision_key(self) -> str:
        """Under what a cost table keeps what this policy's decisions cost per token: its size and mode."""
        cfg = self.config
        return f"dash-{cfg.hidden_size}-{cfg.hidden1}-{cfg.hidden2}-{len(cfg.states)}-{cfg.mode}"

    def wall_clock_costs(self, engine: Engine, fingerprint: str, head: str) -> CostTable:
        """This machine's cost table for the model, knowing what a decode token costs beyond its layers with `head`
        and what these decisions cost (measured the first time, a second or two, and kept with the table)."""
        return wall_clock_table(engine, fingerprint, head, self.decider(1.0, control=False), self.decision_key)

    def operating_point(
        self, asked: Any, costs: CostTable | None = None, head: str = "full", unit: Unit | None = None
    ) -> OperatingPoint:
        """`asked` as an operating point of this policy: with `costs`, this machine's table, a decode wall-clock
        speedup against the full path with the same `head` (the table knows the cost beyond the layers), or with
        `unit` RATIO a compute ratio on that table (methods compared on one table); without, a compute ratio on the
        policy's own table. Refused here, with one message, when out of reach."""
        unit = unit or (Unit.RATIO if costs is None else Unit.SPEEDUP)
        table = self.cost_table() if costs is None else costs
        return resolve(asked, unit, self.max_speedup(costs), table, self.config.num_layers, head, self.decision_key)

    def decider(
        self,
        speedup: float | OperatingPoint,
        mode: str | None = None,
        control: bool = True,
        costs: CostTable | None = None,
        head: str = "full",
    ) -> PolicyDecider:
        """Greedy decisions at `speedup` (a number, resolved by `operating_point`, or a point resolved already
        with the same `costs`); `control` steers each sequence's bias so it runs at the point's compute ratio
        (`methods/dash/control.py`), off: the calibrated bias as it is (the paper's fixed operating point). The
        ratio is counted and steered on `costs` where given, else on the policy's own table."""
        point = speedup if isinstance(speedup, OperatingPoint) else self.operating_point(speedup, costs, head)
        bias = self.bias_for(point.ratio, costs)
        table = costs if costs is not None else self.cost_table()
        rate = self.rate_control(point.ratio, bias, table) if control else None
        return PolicyDecider(self.model, self.scales(), self.costs(), bias, mode=mode, control=rate,
                             decisions=self.decision_key)  # fmt: skip

    def rate_control(self, target: float, bias: float, table: CostTable, steer: bool = True) -> RateControl:
        """A sequence's controller toward `target` from the calibrated `bias`; `steer` off: it only counts what
        the sequence spends (its bias stays where it started: the paper's fixed operating point)."""
        curve = self.curve_on(table)
        return RateControl(target, bias, table, self.config.num_layers, curve.slope(bias), curve.span(bias),
                           GAIN if steer else 0.0)  # fmt: skip

    def save(self, path: str | Path) -> None:
        meta = {**self.meta, "format": POLICY_FORMAT, "version": POLICY_VERSION, "policy_config": asdict(self.config)}
        save_artifact(path, self.model, meta)

    @classmethod
    def load(cls, path: str | Path) -> DashPolicy:
        remedy = "train one with `dashskip train` (or re-copy the file)"
        tensors, meta = load_artifact(path, "policy", POLICY_FORMAT, (1, POLICY_VERSION), remedy)
        require(meta, ("policy_config", "scales", "cost_table", "kv_rule", "fingerprint"), "policy", path, remedy)
        config = meta.pop("policy_config")
        try:
            if meta.get("version") == 1 and "allowed" in config:  # outputs for codes 0, 1, 2, 4; allowed by code
                config["allowed"] = [spec(int(c)).name for c in config["allowed"]]
            model = ScoringModel(PolicyConfig(**config))
        except (TypeError, ValueError, KeyError) as exc:  # a config this dashskip cannot build a scoring model from
            raise DashskipError(f"policy file '{path}' has an unusable policy_config ({exc}); {remedy}") from None
        load_weights(model, tensors, "policy", path)
        return cls(model, meta)
