"""Measured per-state layer costs, so compute ratios mean something on this machine.

A compute ratio is L / sum_i c(s_i); c comes from timing each layer in each
state here (decode: one token against a filled cache; prefill: a block of
tokens), stored per model fingerprint and machine. Before a profile exists the
METHOD.md approximations are used and labelled as such.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dashskip.errors import DashskipError
from dashskip.states import VALID_STATES, State


@dataclass
class CostTable:
    """Relative cost of each state (full = 1), for decode and prefill, plus the raw per-layer timings."""

    decode: dict[int, float]
    prefill: dict[int, float]
    measured: bool = False
    fingerprint: str = ""
    machine: str = ""
    layer_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # from state_errors(), per layer

    @classmethod
    def default(cls) -> CostTable:
        approx = {0: 0.0, 1: 0.4, 2: 0.5, 4: 1.0}
        return cls(decode=dict(approx), prefill=dict(approx))

    def compute_ratio(self, states: torch.Tensor, mode: str = "decode") -> float:
        """L / mean executed cost per token, for states of shape (..., L)."""
        per_token = self.token_costs(states, mode)
        return float(states.shape[-1] / per_token.float().mean().clamp(min=1e-9))

    def token_costs(self, states: torch.Tensor, mode: str = "decode") -> torch.Tensor:
        """Executed cost of each token's path (in full layers), for states of shape (..., L)."""
        table = self.decode if mode == "decode" else self.prefill
        lookup = torch.zeros(5)
        for s, c in table.items():
            lookup[s] = c
        return lookup[states.long()].sum(-1)

    def save(self, path: str | Path) -> None:
        data = asdict(self)
        data["decode"] = {str(k): v for k, v in self.decode.items()}
        data["prefill"] = {str(k): v for k, v in self.prefill.items()}
        atomic_write_text(Path(path), json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> CostTable:
        try:
            data = json.loads(Path(path).read_text())
            table = cls(
                decode={int(k): float(v) for k, v in data["decode"].items()},
                prefill={int(k): float(v) for k, v in data["prefill"].items()},
                measured=bool(data.get("measured")),
                fingerprint=data.get("fingerprint", ""),
                machine=data.get("machine", ""),
                layer_ms=data.get("layer_ms", {}),
                errors=data.get("errors", {}),
            )
        except (OSError, ValueError, KeyError) as exc:
            raise DashskipError(f"cannot read cost table '{path}': {exc}; re-run `dashskip profile`") from exc
        if fingerprint and table.fingerprint and table.fingerprint != fingerprint:
            raise DashskipError(
                f"cost table '{path}' was measured on another model (fingerprint {table.fingerprint}, "
                f"this model {fingerprint}); re-run `dashskip profile --model ...`"
            )
        return table


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside `path`, renamed over it once the write finished: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    yield tmp
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def machine_id() -> str:
    return f"{platform.machine()}-{os.cpu_count()}cpu-torch{torch.__version__}-threads{torch.get_num_threads()}"


def layer_runner(engine, layer_idx: int, x: torch.Tensor, session) -> Callable[[int], torch.Tensor]:
    """Prepare layer `layer_idx` to run alone on `x` (batch, tokens) against the session's cache; returns run(state).

    Rope and mask are computed here, outside what gets timed, as the engine computes them once per step.
    """
    from dashskip.engine import build_mask

    bb, cache = engine.backbone, session.cache
    batch, tokens = x.shape[:2]
    positions = torch.arange(cache.length, cache.length + tokens).expand(batch, tokens)
    cache.begin_step(tokens)
    rope = bb.rope(x, positions)[bb.layer_types[layer_idx]]
    mask = build_mask(None, cache.start, cache.end, bb.windows[layer_idx], batch, bb.attn_implementation)

    @torch.no_grad()
    def run(state: int) -> torch.Tensor:
        try:
            return engine._run_layer(layer_idx, state, x, rope, mask, positions, session, engine.scales[layer_idx])
        finally:
            bb.rows.set_uniform(int(State.FULL))

    return run


def time_layers(engine, layers: list[int], state: int, session, tokens: int, repeats: int) -> list[float]:
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
    engine,
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
    work = [(mode, s) for mode in ("decode", "prefill") for s in VALID_STATES]
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
        full = statistics.mean(timings[mode]["4"])
        rel[mode] = {s: round(statistics.mean(timings[mode][str(s)]) / full, 4) for s in VALID_STATES}
    return CostTable(rel["decode"], rel["prefill"], True, fingerprint, machine_id(), timings)


def default_profile_path(fingerprint: str, kv_rule: str) -> Path:
    """Where the cost table lives; per K/V rule, since the rule sets what a skipped layer costs."""
    from dashskip.loading import cache_dir

    return cache_dir() / "profiles" / f"{fingerprint}-{machine_id()}-{kv_rule}.json"


@torch.no_grad()
def state_errors(engine, input_ids: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """Per inner layer and state, relative error of the layer's output (and of its update, output - input) vs full.

    Every layer gets the real hidden states a full run feeds it, so errors do not compound across layers.
    """
    from dashskip.decisions import Decider

    inputs: dict[int, torch.Tensor] = {}

    class Record(Decider):
        def __call__(self, layer, hidden, previous):
            if 0 < layer < engine.backbone.num_layers - 1:  # first and last layer always run in full
                inputs[layer] = hidden.clone()
            return int(State.FULL)

    batch, tokens = input_ids.shape
    engine.step(input_ids, engine.new_session(batch, tokens), Record())
    out: dict[str, dict[str, list[float]]] = {
        "output": {"0": [], "1": [], "2": []},
        "update": {"0": [], "1": [], "2": []},
    }
    for i in sorted(inputs):
        x = inputs[i]
        run = layer_runner(engine, i, x, engine.new_session(batch, tokens))
        full = run(int(State.FULL))
        for state in ("0", "1", "2"):
            diff = (run(int(state)) - full).norm()
            out["output"][state].append(float(diff / full.norm()))
            out["update"][state].append(float(diff / (full - x).norm()))
    return out
