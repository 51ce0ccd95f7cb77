"""DP-LLM (arXiv 2508.06041) as a comparator: per token and inner layer, the error a lower precision would add,
estimated cheaply, and per-layer thresholds set as quantiles of that estimate, so that a chosen fraction of each
layer's tokens, those the estimate ranks most sensitive, runs in the higher precision.

The estimate is of the error the lower precision adds to the layer's first products: `||(W_hi - W_lo) . norm(x)||`
over q, k, v (fed by the layer's normed input) and gate, up (fed by the normed input of the MLP, approximated
here by the layer's input under the MLP's norm). A random projection G (k x out, k = 64) keeps its size
(Johnson-Lindenstrauss): `||G (W_hi - W_lo) diag(w_norm) x / ||x||||`, one (2k x d) product per layer, folded
once. As DASH's asynchronous mode (and DP-LLM) does, layer i+1 is decided from layer i's input, so the estimate
can run beside the layer. The states are two neighbouring precisions: full and INT8 up to INT8's reach, INT8 and
INT4 beyond it. How many of each layer's tokens run in the lower one follows from the layer's measured damage
(the static baselines' sensitivity table) and its tokens' estimated errors (`dp_llm_for`), in place of DP-LLM's
fitted per-layer precision targets. Thresholds come from WikiText-2 *validation* windows run in full; the
evaluation text is never seen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dashskip.core.context import StateChoice
from dashskip.core.costs import CostTable
from dashskip.core.decisions import Decider, Lookahead, Traits
from dashskip.core.states import State
from dashskip.errors import DashskipError
from dashskip.methods.context import MethodContext, reachable, validation_windows
from dashskip.methods.quantized import sensitivity_for
from dashskip.runtime.engine import Engine

# How far a token's estimated share of its layer's error moves its charge from the layer's mean: 1 trusts the
# estimate fully (a first version), 0 is the static schedule's layer order. Within a layer the tokens' order is the
# estimate's either way; this sets how the budget spreads across layers. On 24 WikiText-2 *validation* windows,
# against static mixed precision: 1.0 lost at compute ratio 3.0 (+0.020 +- 0.003 NLL), 0.5 +0.016, 0.25 tied
# (+0.001 +- 0.001), and at 2.5 and 2.75 every weight gave the same gain (-0.003 +- 0.002).
SHARE_WEIGHT = 0.25
PROJECTION = 64  # rows of the random projection per product group (attention's, the MLP's): ~10% noise
CALIBRATION = (16, 256)  # validation windows x tokens the thresholds are set on
FULL, INT8, INT4 = int(State.FULL), int(State.INT8), int(State.INT4)


def estimators(engine: Engine, low: int, high: int, seed: int = 0) -> list[torch.Tensor | None]:
    """Per layer, the (2k, d) matrix whose product with x / ||x|| estimates the size of what running the layer's
    first products in `low` instead of `high` changes (None for the first and last layers, always full)."""
    gen = torch.Generator().manual_seed(seed)
    layers = engine.backbone.layers
    out: list[torch.Tensor | None] = [None] * len(layers)
    for i in range(1, len(layers) - 1):
        layer, parts = layers[i], []
        for linear, norm in ((layer.qkv, layer.attn_norm), (layer.gate_up, layer.mlp_norm)):
            delta = linear.dequantized(high) - linear.dequantized(low)  # (out, d)
            g = torch.randn(PROJECTION, delta.shape[0], generator=gen) / PROJECTION**0.5
            parts.append((g @ delta) * norm.weight.float()[None, :])
        out[i] = torch.cat(parts).contiguous()
    return out


def estimate(matrix: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """(...,) the estimated error of each token (`hidden` (..., d), a layer's input)."""
    x = hidden.float()
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.linalg.vector_norm(x @ matrix.t(), dim=-1)


class Inputs(Decider):
    """Every layer in full; keeps each layer's input (the calibration run)."""

    def __init__(self) -> None:
        self.hidden: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        self.hidden[layer] = hidden.detach().reshape(-1, hidden.shape[-1]).clone()
        return FULL


# What ranks a layer's tokens: estimator(low, high) -> errors(layer, hidden) -> (tokens,) the estimated size of
# what running `layer` in `low` instead of `high` changes, from the previous layer's input `hidden`.
Errors = Callable[[int, torch.Tensor], torch.Tensor]
Estimator = Callable[[int, int], Errors]


def projection(engine: Engine) -> Estimator:
    """DP-LLM's estimator: the random projection of the weight difference (`estimators`)."""

    def for_pair(low: int, high: int) -> Errors:
        matrices = estimators(engine, low, high)
        return lambda layer, hidden: estimate(matrices[layer], hidden)

    return for_pair


class DPLLM(Lookahead):
    """Layer i+1 runs in `high` where the estimate from layer i's input is above that layer's threshold, else in
    `low`."""

    def __init__(self, errors: Errors, thresholds: list[float], low: int, high: int) -> None:
        self.errors, self.thresholds, self.low, self.high = errors, thresholds, low, high
        self.mode, self.last = "async", len(thresholds) - 1
        self.scales = torch.ones(len(thresholds))
        self.traits = Traits()

    def choose(self, hidden: torch.Tensor, current: int, nxt: int, previous: StateChoice) -> StateChoice:
        above = self.errors(nxt, hidden) > self.thresholds[nxt]
        return torch.where(above, self.high, self.low)


def split(costs: CostTable, num_layers: int, speedup: float) -> tuple[int, int, float]:
    """The two neighbouring precisions that `speedup` (compute ratio) falls between, and the fraction of inner
    token-layers in the higher one; a one-line refusal beyond INT4 on every inner layer."""
    cost = {s: costs.decode[s] for s in (FULL, INT8, INT4)}
    inner = num_layers - 2
    if inner < 1:
        raise DashskipError(f"dp-llm needs a model with inner layers (3 or more); this one has {num_layers}")
    per_layer = (num_layers / speedup - 2 * cost[FULL]) / inner  # mean cost of an inner layer that delivers it
    for low, high in ((INT8, FULL), (INT4, INT8)):
        if per_layer >= cost[low]:
            return low, high, min(1.0, (per_layer - cost[low]) / (cost[high] - cost[low]))
    top = num_layers / (2 * cost[FULL] + inner * cost[INT4])
    reachable("dp-llm", top, speedup, 0.03, top)  # refuses beyond its reach, naming it
    return INT4, INT8, 0.0


def damage_per_layer(ctx: MethodContext, low: int, high: int) -> torch.Tensor:
    """(inner layers,) the mean NLL a layer adds when all its tokens run in `low` instead of `high`, from the
    model's measured sensitivity table (the static baselines' own, cached), never below a small positive floor."""
    delta = sensitivity_for(ctx).delta_nll
    extra = torch.tensor(delta[low]) - (torch.tensor(delta[high]) if high != FULL else 0.0)
    return extra.clamp(min=1e-6)


def dp_llm_for(ctx: MethodContext, speedup: float, estimator: Estimator | None = None) -> Decider:
    """DP-LLM at compute ratio `speedup` on the model's cost table (`estimator`: what ranks a layer's tokens,
    DP-LLM's projection by default; `benchmarks/damage_fit.py` gives DASH's scoring model in its place).

    Budgets go where they cost least: a token-layer moved to the lower precision is charged the layer's measured
    damage scaled by the token's share of the layer's estimated squared error, shrunk toward the layer's mean
    (`D_l * (w e^2 / mean_l(e^2) + 1 - w)`, w = `SHARE_WEIGHT`), and the cheapest moves over all layers are made
    until the ratio is met (one price, a threshold per layer). Uniform fractions per layer lost to static mixed
    precision beyond INT8's reach (SmolLM2 at 2.75: 42.7 vs 40.4)."""
    n = ctx.backbone.num_layers
    if speedup <= 1.0:
        return Decider()
    low, high, fraction = split(ctx.costs, n, speedup)
    errors_of = (estimator or projection(ctx.engine))(low, high)
    grab = Inputs()
    windows = validation_windows(ctx, *CALIBRATION, seed=1)
    with torch.no_grad():
        ctx.engine.step(windows, ctx.engine.new_session(*windows.shape), grab)
        # async: layer i is decided from layer i-1's input
        errors = torch.stack([errors_of(i, grab.hidden[i - 1]) for i in range(1, n - 1)])  # (inner, tokens)
    damage = damage_per_layer(ctx, low, high)
    share = errors**2 / (errors**2).mean(-1, keepdim=True).clamp(min=1e-30)
    share = SHARE_WEIGHT * share + (1 - SHARE_WEIGHT)
    charge = damage[:, None] * share
    moves = round((1 - fraction) * charge.numel())  # token-layers in the lower precision
    if moves == 0:
        return DPLLM(errors_of, [float("-inf")] * n, low, high)
    if moves == charge.numel():  # every one (at the top of its reach): no rounding may leave a token high
        return DPLLM(errors_of, [float("inf")] * n, low, high)
    price = float(charge.reshape(-1).kthvalue(moves).values)
    # a token goes low where its charge is at most the price: w e^2 / mean_l(e^2) + 1 - w <= price / D_l
    bound = ((errors**2).mean(-1) * (price / damage - (1 - SHARE_WEIGHT)) / SHARE_WEIGHT).clamp(min=0).sqrt()
    thresholds = [float("inf"), *bound.tolist(), float("inf")]
    return DPLLM(errors_of, thresholds, low, high)
