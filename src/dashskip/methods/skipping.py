"""Layer-skipping baselines of both papers: static similarity skipping (ShortGPT-style), RandomSkip, SkipDecode and
AdaSkip (sublayers), each at a requested compute ratio on the measured cost table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from dashskip.core.context import StateChoice
from dashskip.core.costs import CostTable
from dashskip.core.decisions import Decider, FixedStates, StepInfo, SublayerSkip, Traits
from dashskip.core.states import State
from dashskip.errors import DashskipError
from dashskip.measure.calibration import Calibration
from dashskip.methods.context import reachable
from dashskip.models.backbone import Backbone


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
    decider.traits = Traits(skip_scales=torch.tensor(calibration.scales))
    return decider


class RandomSkip(Decider):
    """RandomSkip: every inner layer of every token is skipped independently with probability `p`.

    The draws come from the decider's own seeded generator: the same seed, inputs and call order give the same
    states. One draw per position and layer serves every row of a batch, so rows that share a prefix (the answers
    of a multiple-choice question) share its path and differ only where they differ.
    """

    def __init__(self, p: float, num_layers: int, skip_scales: torch.Tensor | None = None, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise DashskipError(f"a skip probability must be in [0, 1], got {p}")
        self.p, self.num_layers, self.traits = p, num_layers, Traits(skip_scales=skip_scales)
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
    saved = max(full - skip, 0.0)  # a noisy table can time a skip at a full layer's cost: then nothing is saved
    top = num_layers / (num_layers * full - inner * saved)
    p = min(max((num_layers * full - num_layers / speedup) / (inner * saved), 0.0), 1.0) if saved else 0.0
    reachable("random skipping", num_layers / (num_layers * full - p * inner * saved), speedup, tolerance, top)
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
        self.num_layers, self.traits = num_layers, Traits(skip_scales=skip_scales)
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
    reachable("SkipDecode", ratio(best), speedup, tolerance, ratio(schedule(2.0)))
    return SkipDecode(best.tolist(), n, skip_scales)


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
    for layer in backbone.hf_layers:
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
        self.traits = Traits(sublayers=sublayers, plan_ratio=plan_ratio)


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
    reachable("AdaSkip", ratios[k], speedup, tolerance, ratios[-1])
    plan: dict[int, SublayerSkip] = {}
    for _, i, kind in order[:k]:
        before = plan.get(i, SublayerSkip())
        if kind == "attn":
            plan[i] = replace(before, attn=calibration.attn_scale[i])
        else:
            plan[i] = replace(before, mlp=calibration.mlp_scale[i])
    return AdaSkip(plan, ratios[k])


