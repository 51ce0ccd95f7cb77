"""The one registry of methods: everything that needs "method M at compute ratio S" (eval, bench, sweeps, lm-eval)
asks `build`, so every method is built the same way from the same cost table and calibration.

A method is a name, a one-line summary (the command line's help is made from these) and a builder that returns
the decider, and the engine if it needs one of its own (the RL adapters sum onto every layer's output). Adding a
baseline is its module plus one `Method` line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dashskip.core.decisions import Decider
from dashskip.core.operating import Unit
from dashskip.errors import DashskipError
from dashskip.measure.calibration import Calibration
from dashskip.methods.context import MethodContext, calibration_for
from dashskip.methods.dp_llm import dp_llm_for
from dashskip.methods.exits import early_exit_for
from dashskip.methods.quantized import QUANT_METHODS, sensitivity_for, static_mixed
from dashskip.methods.rl_adapter import RLAdapter
from dashskip.methods.skipping import adaskip, attention_share, random_skip, skip_decode, static_similarity
from dashskip.runtime.engine import Engine


@dataclass
class MethodOptions:
    """What some methods take besides the model and the ratio."""

    mode: str | None = None  # DASH's decision mode (async or sync; default: the policy's)
    seed: int = 0  # RandomSkip's draws
    calibration: Calibration | None = None  # skip scales and similarities (default: the model's cached one)
    rl_adapter: str | Path | None = None  # trained adapters of the rl-adapter method
    control: bool = True  # DASH: steer each generated sequence to the ratio asked (methods/dash/control.py)


@dataclass
class Built:
    """A method at an operating point: its decider, and its own engine where it needs one."""

    decider: Decider
    engine: Engine | None = None


Builder = Callable[[MethodContext, float, MethodOptions], Built]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    build: Builder


def _calibration(ctx: MethodContext, options: MethodOptions) -> Calibration:
    if options.calibration is not None:
        options.calibration.check(ctx.fingerprint)
        return options.calibration
    return calibration_for(ctx)


def _dash(ctx: MethodContext, speedup: float, options: MethodOptions) -> Built:
    if ctx.policy is None:
        raise DashskipError(
            "method 'dash' needs a trained policy and this model has none; load one (policy=FILE, --policy FILE, "
            "or an alias that ships one)"
        )
    policy, head = ctx.policy, ctx.backbone.head_precision
    if ctx.wall_clock:  # a decode speedup on this machine
        costs = policy.wall_clock_costs(ctx.engine, ctx.fingerprint, head)
        return Built(policy.decider(speedup, options.mode, control=options.control, costs=costs, head=head))
    # A compute ratio on the table every method of the comparison is placed on (its curve read on that table)
    point = policy.operating_point(speedup, ctx.costs, head, Unit.RATIO)
    return Built(policy.decider(point, options.mode, control=options.control, costs=ctx.costs, head=head))


def _quantized(states: tuple[int, ...]) -> Builder:
    return lambda ctx, speedup, options: Built(static_mixed(sensitivity_for(ctx), ctx.costs, speedup, states))


def _rl_adapter(ctx: MethodContext, speedup: float, options: MethodOptions) -> Built:
    if options.rl_adapter is None:
        raise DashskipError("method 'rl-adapter' needs its trained adapters: --rl-adapter FILE")
    adapter = RLAdapter.load(options.rl_adapter)
    engine = adapter.engine(ctx.backbone)
    return Built(adapter.decider(engine, speedup), engine)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("full", "every layer in full precision", lambda ctx, s, o: Built(Decider())),
        Method("dash", "the trained DASH policy (per token and layer: skip / INT4 / INT8 / full)", _dash),
        Method("static", "static skipping of the most similar layers (ShortGPT-style)",
               lambda ctx, s, o: Built(static_similarity(_calibration(ctx, o), ctx.costs, s))),
        Method("int8", "INT8 weights on the least sensitive layers", _quantized(QUANT_METHODS["int8"])),
        Method("int4", "INT4 weights on the least sensitive layers", _quantized(QUANT_METHODS["int4"])),
        Method("mixed", "static mixed precision (INT4 / INT8 per layer)", _quantized(QUANT_METHODS["mixed"])),
        Method("mixed-skip", "static mixed precision plus static skipping", _quantized(QUANT_METHODS["mixed-skip"])),
        Method("dp-llm", "DP-LLM: per token, the layer's estimated quantization error picks the higher of two "
               "precisions (per-layer quantile thresholds)", lambda ctx, s, o: Built(dp_llm_for(ctx, s))),
        Method("early-exit", "exit when the LM head is confident (checked every 2 layers)",
               lambda ctx, s, o: Built(early_exit_for(ctx, s))),
        Method("skipdecode", "SkipDecode: executed layers fall with the token's position",
               lambda ctx, s, o: Built(skip_decode(ctx.backbone.num_layers, ctx.costs, s,
                                                   torch.tensor(_calibration(ctx, o).scales)))),
        Method("adaskip", "AdaSkip: static skipping of attention / MLP sublayers",
               lambda ctx, s, o: Built(adaskip(_calibration(ctx, o), ctx.costs, s, attention_share(ctx.backbone)))),
        Method("random", "RandomSkip: inner layers skipped at random",
               lambda ctx, s, o: Built(random_skip(ctx.backbone.num_layers, ctx.costs, s,
                                                   torch.tensor(_calibration(ctx, o).scales), o.seed))),
        Method("rl-adapter", "the RL-adapter paper's controller (needs trained adapters)", _rl_adapter),
    ]
}  # fmt: skip


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise DashskipError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")
    return METHODS[method]


def build(ctx: MethodContext, method: str, speedup: float, options: MethodOptions | None = None) -> Built:
    """`method` at compute ratio `speedup` on the model's cost table `ctx.costs`.

    The similarity and layer-skipping methods use `options.calibration`, or else the model's cached calibration
    (`calibration_for`), and carry its skip scales; `mixed-skip` skips with the engine's scales, as its sensitivity
    table was measured with them.
    """
    entry = check_method(method)
    if not speedup >= 1.0:
        raise DashskipError(f"speedup must be >= 1.0 (1.0 = every layer in full), got {speedup}")
    return entry.build(ctx, speedup, options or MethodOptions())


def build_decider(ctx: MethodContext, method: str, speedup: float, options: MethodOptions | None = None) -> Decider:
    """The decider of `build`, for methods that run on the model's own engine."""
    built = build(ctx, method, speedup, options)
    if built.engine is not None:
        raise DashskipError(f"method '{method}' runs its own engine; use methods.build")
    return built.decider


def method_help() -> str:
    """The methods and what each does, for help texts."""
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
