"""Baselines as decision functions of the same engine, each hitting a requested compute ratio.

`build_decider` is the one registry of methods: everything that needs "method M at compute ratio S" (eval,
bench, sweeps) asks it, so every method is built the same way from the same cost table and calibration.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dashskip.backbone import Backbone
from dashskip.calibration import Calibration, calibrate, scales_key
from dashskip.decisions import Decider, FixedStates, StateChoice, StepInfo, SublayerSkip
from dashskip.engine import Engine
from dashskip.errors import DashskipError
from dashskip.profiling import CostTable, atomic_write_text
from dashskip.states import State
from dashskip.training import token_nll


def static_similarity(
    calibration: Calibration, costs: CostTable, speedup: float, tolerance: float = 0.03
) -> FixedStates:
    """ShortGPT-style static skipping: skip the inner layers with the highest input/output cosine.

    The number of skipped layers is the one whose compute ratio (measured cost table) is closest to `speedup`;
    it must land within `tolerance` of it.
    """
    n = calibration.num_layers
    inner = sorted(range(1, n - 1), key=lambda i: calibration.cosine[i], reverse=True)
    best, best_gap = None, float("inf")
    for k in range(len(inner) + 1):
        skipped = set(inner[:k])
        ratio = n / sum(costs.decode[0] if i in skipped else costs.decode[4] for i in range(n))
        if abs(ratio - speedup) < best_gap:
            best, best_gap = [0 if i in skipped else 4 for i in range(n)], abs(ratio - speedup)
    if best is None or best_gap > tolerance * speedup:
        raise DashskipError(f"static skipping cannot reach {speedup}x within {tolerance:.0%} on {n} layers")
    decider = FixedStates(best)
    decider.skip_scales = torch.tensor(calibration.scales)
    return decider


QUANT_METHODS: dict[str, tuple[int, ...]] = {
    "int8": (int(State.INT8),),  # INT8 on the least sensitive layers (all inner layers at its top ratio)
    "int4": (int(State.INT4),),
    "mixed": (int(State.INT4), int(State.INT8)),  # static mixed precision
    "mixed-skip": (int(State.SKIP), int(State.INT4), int(State.INT8)),  # ... plus static skipping
}


@dataclass
class Sensitivity:
    """Per state and inner layer, the mean NLL increase when only that layer runs in that state.

    End to end on calibration text, so it includes how a layer's error propagates, not just its size.
    """

    delta_nll: dict[int, list[float]]  # state -> per inner layer 1..L-2
    fingerprint: str
    kv_rule: str
    tokens: int

    def save(self, path: Path) -> None:
        data = {**asdict(self), "delta_nll": {str(k): v for k, v in self.delta_nll.items()}}
        atomic_write_text(path, json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> Sensitivity:
        data = json.loads(path.read_text())
        data["delta_nll"] = {int(k): v for k, v in data["delta_nll"].items()}
        return cls(**data)


def _mean_nll(engine: Engine, windows: torch.Tensor, decider) -> float:
    result = engine.step(windows, engine.new_session(*windows.shape), decider)
    return float(token_nll(engine.backbone.logits(result.hidden), windows).mean())


@torch.no_grad()
def layer_sensitivity(engine: Engine, windows: torch.Tensor, fingerprint: str, progress: bool = True) -> Sensitivity:
    """Time: (L - 2) x 3 forward passes over `windows`."""
    n = engine.backbone.num_layers
    base = _mean_nll(engine, windows, None)
    work = [(s, i) for s in (0, 1, 2) for i in range(1, n - 1)]
    delta: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for state, layer in tqdm(work, desc="layer sensitivity", disable=not progress):
        states = [4] * n
        states[layer] = state
        delta[state].append(_mean_nll(engine, windows, FixedStates(states)) - base)
    return Sensitivity(delta, fingerprint, str(engine.kv_rule), windows.numel())


def sensitivity_for(dm, data_dir=None, progress: bool = True) -> Sensitivity:
    """The model's sensitivity table, measured once on WikiText-2 validation windows and cached."""
    from dashskip.data import load_text, token_windows
    from dashskip.loading import cache_dir

    # Skipping runs with the engine's skip scales, so they are part of what the table measured.
    scales = hashlib.sha256(json.dumps(scales_key(dm.engine.scales)).encode()).hexdigest()[:8]
    path = cache_dir() / "sensitivity" / f"{dm.fingerprint}-{dm.engine.kv_rule}-{scales}.json"
    if path.exists():
        return Sensitivity.load(path)
    windows = token_windows(dm.tokenizer, load_text("wikitext2-valid", data_dir), 4, 128, seed=1)
    table = layer_sensitivity(dm.engine, windows, dm.fingerprint, progress)
    table.save(path)
    return table


def static_mixed(
    sensitivity: Sensitivity, costs: CostTable, speedup: float, allowed: tuple[int, ...], tolerance: float = 0.03
) -> FixedStates:
    """Static per-layer states from calibration sensitivity, chosen greedily to meet `speedup` (compute ratio).

    Each move lowers one layer to a cheaper allowed state; the move with the least NLL increase per unit of
    cost saved goes first. The schedule on that path whose ratio is closest to `speedup` is returned.
    """
    n = len(sensitivity.delta_nll[0]) + 2
    states = [4] * n

    def ratio(schedule: list[int]) -> float:
        return costs.compute_ratio(torch.tensor(schedule))

    def harm(layer: int, state: int) -> float:
        return 0.0 if state == State.FULL else sensitivity.delta_nll[state][layer - 1]

    path = [list(states)]
    while ratio(states) < speedup * (1 + tolerance):
        moves = [(i, s) for i in range(1, n - 1) for s in allowed if costs.decode[s] < costs.decode[states[i]]]
        if not moves:
            break
        i, s = min(
            moves,
            key=lambda m: (
                (harm(m[0], m[1]) - harm(m[0], states[m[0]])) / (costs.decode[states[m[0]]] - costs.decode[m[1]])
            ),
        )
        states[i] = s
        path.append(list(states))
    best = min(path, key=lambda schedule: abs(ratio(schedule) - speedup))
    if abs(ratio(best) - speedup) > tolerance * speedup:
        names = "/".join(State(s).name for s in allowed)
        raise DashskipError(
            f"static {names} reaches compute ratios up to {ratio(path[-1]):.2f} on this model and cost table; "
            f"{speedup} is out of reach within {tolerance:.0%}"
        )
    return FixedStates(best)


def _validation_windows(dm, data_dir, num: int, length: int, seed: int) -> torch.Tensor:
    """Windows of WikiText-2 *validation* text: baselines calibrate there, the test split stays for evaluation."""
    from dashskip.data import load_text, token_windows

    return token_windows(dm.tokenizer, load_text("wikitext2-valid", data_dir), num, length, seed=seed)


def calibration_for(dm, data_dir=None, progress: bool = True) -> Calibration:
    """The model's calibration (skip scales, layer and sublayer similarity), measured once and cached.

    128 windows of 256 tokens, as `dashskip calibrate` defaults to (the paper's N = 128), so the similarity
    baselines need no calibration file.
    """
    from dashskip.loading import cache_dir

    path = cache_dir() / "calibration" / f"{dm.fingerprint}.json"
    if path.exists():
        return Calibration.load(path)
    windows = _validation_windows(dm, data_dir, 128, 256, seed=0)
    result = calibrate(dm.model, windows, dm.fingerprint, progress=progress, meta={"data": "wikitext2-valid"})
    result.save(path)
    return result


def _reachable(method: str, ratio: float, speedup: float, tolerance: float, top: float) -> None:
    if abs(ratio - speedup) > tolerance * speedup:
        raise DashskipError(
            f"{method} reaches compute ratios up to {top:.2f} on this model and cost table; {speedup} is out of "
            f"reach within {tolerance:.0%}"
        )


class RandomSkip(Decider):
    """RandomSkip: every inner layer of every token is skipped independently with probability `p`.

    The draws come from the decider's own seeded generator: the same seed, inputs and call order give the same
    states. One draw per position and layer serves every row of a batch, so rows that share a prefix (the answers
    of a multiple-choice question) share its path and differ only where they differ.
    """

    def __init__(self, p: float, num_layers: int, skip_scales: torch.Tensor | None = None, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise DashskipError(f"a skip probability must be in [0, 1], got {p}")
        self.p, self.num_layers, self.skip_scales = p, num_layers, skip_scales
        self.generator = torch.Generator().manual_seed(seed)
        self.shape: torch.Size | None = None

    def begin(self, step: StepInfo) -> None:
        self.shape = step.positions.shape

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        if layer in (0, self.num_layers - 1):
            return int(State.FULL)
        skip = (torch.rand(self.shape[-1], generator=self.generator) < self.p).expand(self.shape)
        return torch.where(skip, int(State.SKIP), int(State.FULL))


def random_skip(
    num_layers: int,
    costs: CostTable,
    speedup: float,
    skip_scales: torch.Tensor | None = None,
    seed: int = 0,
    tolerance: float = 0.03,
) -> RandomSkip:
    """RandomSkip whose *expected* compute ratio is `speedup`.

    A token's expected cost is 2 c_full + (L - 2) (p c_skip + (1 - p) c_full) and the compute ratio is L over the
    mean cost, so p = (L c_full - L / speedup) / ((L - 2) (c_full - c_skip)).
    """
    full, skip, inner = costs.decode[4], costs.decode[0], num_layers - 2
    top = num_layers / (2 * full + inner * skip)
    p = min((num_layers * full - num_layers / speedup) / (inner * (full - skip)), 1.0)
    _reachable("random skipping", num_layers / (num_layers * full - p * inner * (full - skip)), speedup, tolerance, top)
    return RandomSkip(p, num_layers, skip_scales, seed)


class SkipDecode(Decider):
    """SkipDecode: how many layers a token runs depends only on its position, so a batch shares one schedule.

    A token at position t runs layer 0 and the top `executed[t] - 1` layers and skips the lower/middle ones
    between: SkipDecode keeps the top layers, which the output depends on most. Positions past the schedule run
    its last entry. The paper schedules generated positions; here every position is scheduled, prompt tokens
    included, so for perplexity every scored position counts as a generated one.
    """

    def __init__(self, executed: Sequence[int], num_layers: int, skip_scales: torch.Tensor | None = None) -> None:
        self.executed = torch.as_tensor(executed, dtype=torch.long)
        if not len(self.executed) or bool((self.executed[1:] > self.executed[:-1]).any()):
            raise DashskipError("a SkipDecode schedule is a non-empty, non-increasing list of executed layer counts")
        if int(self.executed.min()) < 2 or int(self.executed.max()) > num_layers:
            raise DashskipError(f"SkipDecode runs between 2 (first and last) and {num_layers} layers per token")
        self.num_layers, self.skip_scales = num_layers, skip_scales
        self.positions: torch.Tensor | None = None

    def begin(self, step: StepInfo) -> None:
        self.positions = step.positions

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        if layer == 0:
            return int(State.FULL)
        executed = self.executed[self.positions.clamp(max=len(self.executed) - 1)]
        return torch.where(layer >= self.num_layers - (executed - 1), int(State.FULL), int(State.SKIP))


def skip_decode(
    num_layers: int,
    costs: CostTable,
    speedup: float,
    skip_scales: torch.Tensor | None = None,
    horizon: int = 256,
    end_fraction: float = 0.5,
    tolerance: float = 0.03,
) -> SkipDecode:
    """SkipDecode whose mean compute ratio over positions 0..horizon-1 is `speedup`.

    The executed layer count falls linearly from k0 at position 0 to `end_fraction` * k0 at position horizon-1
    (clipped to [2, L], where it keeps the same mean), rounded to whole layers; the mean count is set by bisection.
    """
    if horizon < 1 or not 0.0 < end_fraction <= 1.0:
        raise DashskipError(f"SkipDecode needs horizon >= 1 and 0 < end_fraction <= 1, got {horizon}, {end_fraction}")
    n, full, skip = num_layers, costs.decode[4], costs.decode[0]
    along = torch.arange(horizon, dtype=torch.float64) / max(horizon - 1, 1)

    def schedule(mean: float) -> torch.Tensor:
        start = 2 * mean / (1 + end_fraction)
        end = start * end_fraction
        if start > n:
            start, end = n, 2 * mean - n
        if end < 2:
            start, end = 2 * mean - 2, 2
        return torch.round(start + (end - start) * along).clamp(2, n).long()

    def ratio(executed: torch.Tensor) -> float:
        return n / float((executed * full + (n - executed) * skip).double().mean())

    lo, hi = 2.0, float(n)  # mean executed layers: ratio(lo) is the largest, ratio(hi) = 1
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(schedule(mid)) > speedup else (lo, mid)
    best = min((schedule(lo), schedule(hi)), key=lambda e: abs(ratio(e) - speedup))
    _reachable("SkipDecode", ratio(best), speedup, tolerance, ratio(schedule(2.0)))
    return SkipDecode(best.tolist(), n, skip_scales)


class EarlyExit(Decider):
    """Early exit: after every `every`-th layer (from layer 1 on) a token still running checks the top softmax
    probability of the LM head on its hidden state; at `threshold` or above it exits and skips every later layer,
    the last one included.

    Its skip scales are 1, so an exited token's final hidden state *is* its hidden state at the exit and its
    logits are exactly the head's on it (the final norm included): decoding from the exit layer. Later tokens
    still find K/V at the layers it skipped, left by the engine's K/V rule as for any skipped token. The checks
    run the head at `head` precision (INT8: cheap); they are LM-head evaluations the layer-count compute ratio
    leaves out, counted in `checks_per_token`.
    """

    may_skip_last = True

    def __init__(self, backbone: Backbone, threshold: float, every: int = 2, head: str = "int8") -> None:
        if every < 1:
            raise DashskipError(f"early exit checks every N >= 1 layers, got {every}")
        backbone.head_weights(head)  # checks the precision and makes its weights once
        n = backbone.num_layers
        self.backbone, self.threshold, self.head = backbone, threshold, head
        self.exits = frozenset(range(max(every - 1, 1), n - 1, every))  # layers after which a token may exit
        self.skip_scales = torch.ones(n)
        self.exited: torch.Tensor | None = None
        self.checks = 0
        self.tokens = 0

    def begin(self, step: StepInfo) -> None:
        self.exited = torch.zeros(step.positions.shape, dtype=torch.bool)
        self.tokens += step.positions.numel()

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        if layer - 1 in self.exits:
            live = ~self.exited
            count = int(live.sum())
            if count:
                confidence = self.backbone.logits(hidden[live], self.head).float().softmax(-1).amax(-1)
                self.exited[live] = confidence >= self.threshold
                self.checks += count
        if not bool(self.exited.any()):
            return int(State.FULL)
        return torch.where(self.exited, int(State.SKIP), int(State.FULL))

    @property
    def checks_per_token(self) -> float:
        """Mean LM-head confidence checks per token run so far."""
        return self.checks / max(self.tokens, 1)


class FixedExit(Decider):
    """LayerSkip-style exit at a fixed layer: every token runs the first `keep` layers in full and leaves the
    rest, the last included, with scale 1, so its logits are the head's (final norm included) on layer `keep`'s
    output. The drafter of LayerSkip's self-speculative decoding, without its early-exit training."""

    may_skip_last = True

    def __init__(self, num_layers: int, keep: int) -> None:
        if not 1 <= keep <= num_layers:
            raise DashskipError(f"a fixed exit keeps 1..{num_layers} layers, got {keep}")
        self.keep, self.num_layers = keep, num_layers
        self.skip_scales = torch.ones(num_layers)

    def begin(self, step: StepInfo) -> None:
        if step.num_layers != self.num_layers:
            raise DashskipError(f"fixed exit built for {self.num_layers} layers, the model has {step.num_layers}")

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        return int(State.FULL) if layer < self.keep else int(State.SKIP)


@torch.no_grad()
def exit_threshold(
    engine: Engine,
    windows: torch.Tensor,
    costs: CostTable,
    speedup: float,
    every: int = 2,
    head: str = "int8",
    tolerance: float = 0.03,
) -> float:
    """The confidence threshold at which early exit runs at `speedup` (compute ratio) on `windows`, by bisection.

    The ratio falls as the threshold rises. Each probe is a real run of the engine: an exit changes the K/V later
    tokens attend to, so the full model's confidences would not predict the states. Infinity: nobody exits.
    """

    def ratio(threshold: float) -> float:
        decider = EarlyExit(engine.backbone, threshold, every, head)
        return costs.compute_ratio(engine.step(windows, engine.new_session(*windows.shape), decider).states)

    top = ratio(0.0)
    tried = {0.0: top, math.inf: 1.0}
    lo, hi = 0.0, 1.0
    for _ in range(30):
        best = min(tried, key=lambda t: abs(tried[t] - speedup))
        if abs(tried[best] - speedup) <= 0.01 * speedup:  # other text moves the ratio by more than this anyway
            break
        mid = (lo + hi) / 2
        tried[mid] = ratio(mid)
        lo, hi = (mid, hi) if tried[mid] > speedup else (lo, mid)
    best = min(tried, key=lambda t: abs(tried[t] - speedup))
    _reachable(f"early exit (every {every} layers)", tried[best], speedup, tolerance, top)
    return best


def early_exit_for(dm, speedup: float, data_dir=None, every: int = 2, head: str = "int8") -> EarlyExit:
    """Early exit at `speedup` on `dm.costs`, its threshold calibrated on WikiText-2 validation windows and cached
    (a bisection is some twenty forward passes)."""
    from dashskip.loading import cache_dir

    path = cache_dir() / "early-exit" / f"{dm.fingerprint}-{dm.engine.kv_rule}.json"
    key = json.dumps([speedup, every, head, sorted(dm.costs.decode.items())])
    known = json.loads(path.read_text()) if path.exists() else {}
    if key not in known:
        windows = _validation_windows(dm, data_dir, 8, 128, seed=1)
        known[key] = exit_threshold(dm.engine, windows, dm.costs, speedup, every, head)
        atomic_write_text(path, json.dumps(known))
    return EarlyExit(dm.backbone, known[key], every, head)


def _linear_bytes(module: nn.Module) -> int:
    return sum(
        p.numel() * p.element_size()
        for m in module.modules()
        if isinstance(m, nn.Linear)
        for p in (m.weight, m.bias)
        if p is not None
    )


def attention_share(backbone: Backbone) -> list[float]:
    """Per layer, the attention linears' share of the layer's weight bytes.

    Decode reads every weight once per token and is bandwidth bound (see `bench.layer_bytes`), so this is the
    share of a layer's measured full cost its attention sublayer takes; the MLP takes the rest.
    """
    shares = []
    for layer in backbone.layers:
        attn, mlp = _linear_bytes(layer.self_attn), _linear_bytes(layer.mlp)
        shares.append(attn / (attn + mlp))
    return shares


class AdaSkip(Decider):
    """AdaSkip: attention and MLP sublayers skipped by their similarity importance on calibration data.

    Every layer's state stays full; the skipping is the static `sublayers` plan the engine runs, so the compute
    ratio cannot be read from the states: it is `plan_ratio`, a sublayer costing its layer's full cost times its
    share of the layer's weight bytes (`attention_share`).
    """

    def __init__(self, sublayers: dict[int, SublayerSkip], plan_ratio: float) -> None:
        self.sublayers = sublayers
        self.plan_ratio = plan_ratio


def adaskip(
    calibration: Calibration, costs: CostTable, speedup: float, attn_share: Sequence[float], tolerance: float = 0.03
) -> AdaSkip:
    """Skip the least important inner-layer sublayers first (importance = 1 - cosine of the residual stream
    before and after the sublayer) until the ratio closest to `speedup`.

    A skipped attention gives `mid = attn_scale_i * x`, a skipped MLP `out = mlp_scale_i * mid`: the calibrated
    norm ratios. A layer with both skipped costs nothing: no token attends there, so it needs no K/V either.
    """
    n, full = calibration.num_layers, costs.decode[4]
    inner = range(1, n - 1)
    order = sorted(
        [(1 - calibration.attn_cosine[i], i, "attn") for i in inner]
        + [(1 - calibration.mlp_cosine[i], i, "mlp") for i in inner]
    )
    ratios, saved = [1.0], 0.0
    for _, i, kind in order:
        saved += full * (attn_share[i] if kind == "attn" else 1 - attn_share[i])
        ratios.append(n / (n * full - saved))
    k = min(range(len(ratios)), key=lambda j: abs(ratios[j] - speedup))
    _reachable("AdaSkip", ratios[k], speedup, tolerance, ratios[-1])
    plan: dict[int, SublayerSkip] = {}
    for _, i, kind in order[:k]:
        before = plan.get(i, SublayerSkip())
        if kind == "attn":
            plan[i] = replace(before, attn=calibration.attn_scale[i])
        else:
            plan[i] = replace(before, mlp=calibration.mlp_scale[i])
    return AdaSkip(plan, ratios[k])


METHODS: tuple[str, ...] = (
    "full",
    "dash",
    "static",
    *QUANT_METHODS,
    "early-exit",
    "skipdecode",
    "adaskip",
    "random",
)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise DashskipError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")


def build_decider(
    dm,
    method: str,
    speedup: float,
    *,
    data_dir=None,
    mode: str | None = None,
    seed: int = 0,
    calibration: Calibration | None = None,
) -> Decider:
    """The decider of `method` at compute ratio `speedup` on the model's cost table `dm.costs`.

    The similarity and layer-skipping methods use `calibration`, or else the model's cached calibration
    (`calibration_for`), and carry its skip scales; `mixed-skip` skips with the engine's scales, as its sensitivity
    table was measured with them. `mode` is DASH's decision mode, `seed` RandomSkip's.
    """
    check_method(method)
    if not speedup >= 1.0:
        raise DashskipError(f"speedup must be >= 1.0 (1.0 = every layer in full), got {speedup}")
    n, costs = dm.backbone.num_layers, dm.costs
    if method == "full":
        return Decider()
    if method == "dash":
        if dm.policy is None:
            raise DashskipError(
                "method 'dash' needs a trained policy and this model has none; load one (policy=FILE, --policy FILE, "
                "or an alias that ships one)"
            )
        return dm.policy.decider(speedup, mode)
    if method in QUANT_METHODS:
        return static_mixed(sensitivity_for(dm, data_dir), costs, speedup, QUANT_METHODS[method])
    if method == "early-exit":
        return early_exit_for(dm, speedup, data_dir)
    if calibration is not None:
        calibration.check(dm.fingerprint)
    cal = calibration or calibration_for(dm, data_dir)
    if method == "static":
        return static_similarity(cal, costs, speedup)
    if method == "adaskip":
        return adaskip(cal, costs, speedup, attention_share(dm.backbone))
    if method == "skipdecode":
        return skip_decode(n, costs, speedup, torch.tensor(cal.scales))
    return random_skip(n, costs, speedup, torch.tensor(cal.scales), seed)
