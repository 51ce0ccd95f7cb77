"""Static quantization baselines: uniform INT8 / INT4, static mixed precision (and with static skipping), per
layer from measured sensitivity, at a requested compute ratio."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dashskip.core.costs import CostTable
from dashskip.core.decisions import FixedStates
from dashskip.core.files import atomic_write_text, cache_dir
from dashskip.core.kernels import activations
from dashskip.core.losses import token_nll
from dashskip.core.states import State, registered, spec
from dashskip.errors import DashskipError
from dashskip.methods.context import MethodContext, scales_digest, validation_windows
from dashskip.runtime.engine import Engine

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
    others = [s.code for s in registered() if s.code != State.FULL]
    work = [(s, i) for s in others for i in range(1, n - 1)]
    delta: dict[int, list[float]] = {s: [] for s in others}
    for state, layer in tqdm(work, desc="layer sensitivity", disable=not progress):
        states = [4] * n
        states[layer] = state
        delta[state].append(_mean_nll(engine, windows, FixedStates(states)) - base)
    return Sensitivity(delta, fingerprint, str(engine.kv_rule), windows.numel())


def sensitivity_for(ctx: MethodContext) -> Sensitivity:
    """The model's sensitivity table, measured once on WikiText-2 validation windows and cached."""
    # Skipping runs with the engine's skip scales, so they are part of what the table measured.
    scales = scales_digest(ctx.engine.scales)
    # The quantized states' arithmetic (int8 or bf16 activations) is part of what it measured too.
    path = cache_dir() / "sensitivity" / f"{ctx.fingerprint}-{ctx.engine.kv_rule}-{scales}-{activations()}.json"
    if path.exists():
        return Sensitivity.load(path)
    windows = validation_windows(ctx, 4, 128, seed=1)
    table = layer_sensitivity(ctx.engine, windows, ctx.fingerprint, ctx.progress)
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
        names = "/".join(spec(s).name for s in allowed)
        raise DashskipError(
            f"static {names} reaches compute ratios up to {ratio(path[-1]):.2f} on this model and cost table; "
            f"{speedup} is out of reach within {tolerance:.0%}"
        )
    return FixedStates(best)


