"""Exit-style baselines: early exit by the LM head's confidence (CALM-style, checked every few layers) and a
fixed exit layer (LayerSkip's drafter)."""

from __future__ import annotations

import json
import math

import torch

from dashskip.core.context import StateChoice
from dashskip.core.costs import CostTable
from dashskip.core.decisions import Decider, StepInfo, Traits
from dashskip.core.files import atomic_write_text, cache_dir
from dashskip.core.states import State
from dashskip.errors import DashskipError
from dashskip.methods.context import MethodContext, reachable, validation_windows
from dashskip.models.backbone import Backbone
from dashskip.runtime.engine import Engine


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

    def __init__(self, backbone: Backbone, threshold: float, every: int = 2, head: str = "int8") -> None:
        if every < 1:
            raise DashskipError(f"early exit checks every N >= 1 layers, got {every}")
        backbone.check_head(head)
        n = backbone.num_layers
        self.backbone, self.threshold, self.head = backbone, threshold, head
        self.exits = frozenset(range(max(every - 1, 1), n - 1, every))  # layers after which a token may exit
        self.traits = Traits(skip_scales=torch.ones(n), may_skip_last=True)
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

    def __init__(self, num_layers: int, keep: int) -> None:
        if not 1 <= keep <= num_layers:
            raise DashskipError(f"a fixed exit keeps 1..{num_layers} layers, got {keep}")
        self.keep, self.num_layers = keep, num_layers
        self.traits = Traits(skip_scales=torch.ones(num_layers), may_skip_last=True)

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
    reachable(f"early exit (every {every} layers)", tried[best], speedup, tolerance, top)
    return best


def early_exit_for(ctx: MethodContext, speedup: float, every: int = 2, head: str = "int8") -> EarlyExit:
    """Early exit at `speedup` on `dm.costs`, its threshold calibrated on WikiText-2 validation windows and cached
    (a bisection is some twenty forward passes)."""
    path = cache_dir() / "early-exit" / f"{ctx.fingerprint}-{ctx.engine.kv_rule}.json"
    key = json.dumps([speedup, every, head, sorted(ctx.costs.decode.items())])
    known = json.loads(path.read_text()) if path.exists() else {}
    if key not in known:
        windows = validation_windows(ctx, 8, 128, seed=1)
        known[key] = exit_threshold(ctx.engine, windows, ctx.costs, speedup, every, head)
        atomic_write_text(path, json.dumps(known))
    return EarlyExit(ctx.backbone, known[key], every, head)


