"""Measured per-state layer costs, so compute ratios mean something on this machine.

A compute ratio is L / sum_i c(s_i); c comes from timing each layer in each
state here (decode: one token against a filled cache; prefill: a block of
tokens), stored per model fingerprint and machine. Before a profile exists the
METHOD.md approximations are used and labelled as such.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dashskip.core.context import Rows
from dashskip.core.costs import CostTable
from dashskip.core.decisions import Decider, FixedStates, TimedDecider
from dashskip.core.files import cache_dir
from dashskip.core.kernels import activations, host_description, host_fingerprint
from dashskip.core.states import State, codes, registered
from dashskip.errors import DashskipError
from dashskip.runtime.engine import Engine, Session


def machine_id() -> str:
    """The host a table was measured on (CPU model and flags, threads, torch): costs do not transfer between."""
    return f"host-{host_fingerprint()}"


def layer_runner(engine: Engine, layer_idx: int, x: torch.Tensor, session: Session) -> Callable[[int], torch.Tensor]:
    """Prepare layer `layer_idx` to run alone on `x` (batch, tokens) against the session's cache; returns run(state).

    Rope and mask are computed here, outside what gets timed, as the engine computes them once per step.
    """
    tokens = x.shape[1]
    positions = session.positions(tokens)
    session.cache.begin_step(tokens)
    step = engine.context(session, x, positions)

    @torch.no_grad()
    def run(state: int) -> torch.Tensor:
        return engine.run_layer(layer_idx, Rows(int(state)), x, step, engine.scales[layer_idx])

    return run


def time_layers(engine: Engine, layers: list[int], state: int, session, tokens: int, repeats: int) -> list[float]:
    """Median ms of each layer in one state for `tokens` new tokens against the session's cache.

    Layers are timed in sweeps, one after the other as decode runs them: timing one layer in a loop keeps its
    weights in the CPU cache and reports about half the time it takes in a real decode step.
    """
    bb = engine.backbone
    x = torch.randn(1, tokens, bb.config.hidden_size, dtype=bb.dtype) * 0.5
    runs = [layer_runner(engine, i, x, session) for i in layers]
    times: list[list[float]] = [[] for _ in layers]
    for sweep in range(repeats + 1):  # the first sweep warms up
        for run, record in zip(runs, times, strict=True):
            t0 = time.perf_counter()
            run(state)
            if sweep:
                record.append((time.perf_counter() - t0) * 1000)
    return [statistics.median(t) for t in times]


def profile(
    engine: Engine,
    fingerprint: str,
    context: int = 128,
    prefill_tokens: int = 256,
    repeats: int = 5,
    layers: list[int] | None = None,
    progress: bool = True,
) -> CostTable:
    """Time every (layer, state) in decode and prefill and turn the medians into relative costs."""
    bb = engine.backbone
    layers = layers if layers is not None else list(range(1, bb.num_layers - 1)) or [0]
    if any(not 0 <= i < bb.num_layers for i in layers):
        raise DashskipError(f"layer indices must be in [0, {bb.num_layers - 1}]")
    timings: dict[str, dict[str, list[float]]] = {"decode": {}, "prefill": {}}
    work = [(mode, s) for mode in ("decode", "prefill") for s in codes()]
    bar = tqdm(total=len(work), desc="profiling states", disable=not progress)
    sessions = {"decode": engine.new_session(1, capacity=context + 2), "prefill": engine.new_session(1, prefill_tokens)}
    engine.step(torch.randint(0, bb.config.vocab_size, (1, context)), sessions["decode"])  # the cached context
    for mode, state in work:
        tokens = 1 if mode == "decode" else prefill_tokens
        # Timing writes at the step position without advancing, so a session serves every run.
        timings[mode][str(state)] = time_layers(engine, layers, state, sessions[mode], tokens, repeats)
        bar.update(1)
    bar.close()
    rel = {}
    for mode in ("decode", "prefill"):
        full = statistics.mean(timings[mode][str(int(State.FULL))])
        rel[mode] = {s: round(statistics.mean(timings[mode][str(s)]) / full, 4) for s in codes()}
    table = CostTable(rel["decode"], rel["prefill"], True, fingerprint, host_description(), timings)
    measure_beyond_layers(engine, table, bb.head_precision, context=context)
    return table


class _Consulted(TimedDecider):
    """Asks the decider at every layer as decode does, timing its answers, and runs every layer in full."""

    def __call__(self, layer: int, hidden: torch.Tensor, previous) -> int:
        super().__call__(layer, hidden, previous)
        return int(State.FULL)


def measure_beyond_layers(
    engine: Engine,
    table: CostTable,
    head: str,
    decider: Decider | None = None,
    key: str | None = None,
    context: int = 128,
    steps: int = 16,
) -> None:
    """Time real decode steps (the LM head at `head`, greedy) and put into `table` what a token costs beyond its
    layers: `outside[head]` (embedding, norm, head, sampling, the engine's loop); with `decider`, also
    `decisions[key]`, the time its answers took. Both in full layers, medians over `steps` steps against a
    `context`-token cache.

    Steps with every layer in full alternate with steps whose inner layers are skipped: their difference is the
    inner layers' cost at this moment, (L - 2) x (1 - skip cost) full layers, which converts milliseconds into full
    layers at the same time as they were measured. A shared host runs at different speeds from minute to minute,
    and the sweep that timed the states ran earlier."""
    bb = engine.backbone
    n = bb.num_layers
    consulted = _Consulted(decider or Decider())
    skipping = FixedStates([int(State.FULL)] + [int(State.SKIP)] * (n - 2) + [int(State.FULL)])
    session = engine.new_session(1, context + 2 * steps + 5)
    token = bb.logits(engine.step(torch.randint(0, bb.config.vocab_size, (1, context)), session).hidden[:, -1:])
    token = token.argmax(-1)
    full_ms, skip_ms, deciding = [], [], []
    for i in range(steps + 2):  # the first two warm up (the head's form, kernel choices)
        for times, step_decider in ((full_ms, consulted), (skip_ms, skipping)):
            consulted.seconds = 0.0
            t0 = time.perf_counter()
            token = bb.logits(engine.step(token, session, step_decider).hidden[:, -1:], head).argmax(-1)
            if i >= 2:
                times.append((time.perf_counter() - t0 - consulted.seconds) * 1000)
                if step_decider is consulted:
                    deciding.append(consulted.seconds * 1000)
    full, skipped = statistics.median(full_ms), statistics.median(skip_ms)
    saved = (n - 2) * (1 - table.cost(int(State.SKIP)))  # full layers a skipping step saves
    # Where skipping saves too little to measure by (a tiny model's layers cost less than the engine's loop),
    # the sweep's own full-layer time converts instead.
    sweep_ms = statistics.mean(table.layer_ms["decode"][str(int(State.FULL))])
    layer_ms = (full - skipped) / saved if saved >= 1 and full > skipped else sweep_ms
    table.outside[head] = round(max(full / layer_ms - n, 0.0), 4)
    if decider is not None and key is not None:
        table.decisions[key] = round(statistics.median(deciding) / layer_ms, 4)


def default_profile_path(fingerprint: str, kv_rule: str) -> Path:
    """Where the cost table lives; per K/V rule, since the rule sets what a skipped layer costs, and per activation
    arithmetic, since it sets what the INT8 and INT4 states cost."""
    return cache_dir() / "profiles" / f"{fingerprint}-{machine_id()}-{kv_rule}-{activations()}.json"


def cost_table_for(engine: Engine, fingerprint: str, progress: bool = True) -> CostTable:
    """This machine's cost table for the model, from the cache; measured now (a quick profile of every third inner
    layer, announced) if there is none yet. `dashskip profile` measures it fully."""
    path = default_profile_path(fingerprint, str(engine.kv_rule))
    if path.exists():
        return CostTable.load(path, fingerprint)
    print("dashskip: no cost table for this model on this machine yet; measuring one (`dashskip profile` does it "
          "fully)", file=sys.stderr)  # fmt: skip
    n = engine.backbone.num_layers
    table = profile(engine, fingerprint, repeats=3, layers=list(range(1, n - 1, 3)) or [0], progress=progress)
    table.save(path)
    return table


def wall_clock_table(
    engine: Engine, fingerprint: str, head: str, decider: Decider | None = None, key: str | None = None
) -> CostTable:
    """This machine's cost table, knowing what a decode token costs beyond its layers with `head` (and, given a
    decider, what its decisions cost under `key`): what is missing is measured now (a second or two) and kept."""
    table = cost_table_for(engine, fingerprint)
    if not table.wall_clock(head, key if decider is not None else None):
        measure_beyond_layers(engine, table, head, decider, key)
        table.save(default_profile_path(fingerprint, str(engine.kv_rule)))
    return table


@torch.no_grad()
def state_errors(engine: Engine, input_ids: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """Per inner layer and state, relative error of the layer's output (and of its update, output - input) vs full.

    Every layer gets the real hidden states a full run feeds it, so errors do not compound across layers.
    """
    inputs: dict[int, torch.Tensor] = {}

    class Record(Decider):
        def __call__(self, layer, hidden, previous):
            if 0 < layer < engine.backbone.num_layers - 1:  # first and last layer always run in full
                inputs[layer] = hidden.clone()
            return int(State.FULL)

    batch, tokens = input_ids.shape
    engine.step(input_ids, engine.new_session(batch, tokens), Record())
    others = [str(s.code) for s in registered() if s.code != State.FULL]
    out: dict[str, dict[str, list[float]]] = {"output": {s: [] for s in others}, "update": {s: [] for s in others}}
    for i in sorted(inputs):
        x = inputs[i]
        run = layer_runner(engine, i, x, engine.new_session(batch, tokens))
        full = run(int(State.FULL))
        for state in others:
            diff = (run(int(state)) - full).norm()
            out["output"][state].append(float(diff / full.norm()))
            out["update"][state].append(float(diff / (full - x).norm()))
    return out
