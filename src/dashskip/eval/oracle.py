"""Hindsight oracles: how much could choosing states per window or per token gain over one static schedule?

DASH's premise is that some tokens need less of the model than others. Whether that is true enough to matter on
a given model is measurable without any policy: score the same windows under a ladder of static per-layer
schedules (the sensitivity-greedy paths of the static baselines, from full to as fast as they go), keep every
token's NLL and its prediction's KL divergence from the full model's under every schedule, and let an oracle
that has seen them pick, under a budget on the mean cost per token:

- `schedule`: one schedule for all windows (the best static schedule, chosen on the test windows themselves);
- `window`: a schedule per window (what a per-sequence operating point could gain);
- `token`: a schedule per token (what a per-token policy choosing among these schedules could gain).

Each pick minimises a criterion summed over units at a mean cost no higher than the budget (a Lagrangian: every
unit takes the schedule minimising criterion + lambda * cost, with lambda the smallest that meets the budget),
and is scored by its NLL. Two criteria:

- the NLL itself (`label` hindsight): the oracle sees the next token, so it also picks, token by token, whichever
  schedule's rounding noise happened to favour the right answer; among dozens of schedules that luck alone beats
  the full model. A loose bound, reported so that nobody mistakes it for headroom;
- the KL divergence from the full model's prediction (`fidelity` hindsight): the oracle knows exactly how far
  each schedule moves each prediction, but not the answer. This is the bound that matters for a policy whose
  aim is to compute less where it changes little, which is DASH's.

The token oracle scores each token with the context its own schedule computed (each schedule keeps its own K/V
cache), which a real per-token policy, whose context mixes schedules, would not have: a bound on this family of
policies, not a proof about every policy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dashskip.core.costs import CostTable
from dashskip.core.decisions import FixedStates
from dashskip.core.files import atomic_path
from dashskip.core.losses import token_kl, token_nll
from dashskip.errors import DashskipError
from dashskip.methods.quantized import Sensitivity, static_mixed
from dashskip.runtime.engine import Engine

Granularity = Literal["schedule", "window", "token"]
GRANULARITIES: tuple[Granularity, ...] = ("schedule", "window", "token")


def schedule_ladder(
    sensitivity: Sensitivity, costs: CostTable, allowed: dict[str, tuple[int, ...]], ratios: list[float]
) -> list[list[int]]:
    """The distinct static schedules the sensitivity-greedy baselines pick at each compute ratio (full first);
    ratios a scheme cannot reach are left to the schemes that can."""
    n = len(sensitivity.delta_nll[0]) + 2
    ladder = {tuple([4] * n): None}
    for states in allowed.values():
        for ratio in ratios:
            try:
                ladder[tuple(static_mixed(sensitivity, costs, ratio, states).states)] = None
            except DashskipError:
                continue
    return [list(schedule) for schedule in ladder]


@torch.no_grad()
def ladder_scores(
    engine: Engine, windows: torch.Tensor, ladder: list[list[int]], batch: int = 4, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's next-token NLL under every schedule, and the KL divergence of its prediction from the full
    model's: two (schedules, windows, tokens - 1) tensors. The full model runs once per batch of windows."""
    shape = (len(ladder), windows.shape[0], windows.shape[1] - 1)
    nll, kl = torch.empty(shape, dtype=torch.float64), torch.empty(shape, dtype=torch.float64)
    deciders = [FixedStates(schedule) for schedule in ladder]
    with tqdm(total=len(ladder) * windows.shape[0], desc="schedules x windows", disable=not progress) as bar:
        for start in range(0, windows.shape[0], batch):
            ids = windows[start : start + batch]
            reference = engine.backbone.logits(engine.score(ids, None).hidden)
            for s, decider in enumerate(deciders):
                logits = engine.backbone.logits(engine.score(ids, decider).hidden)
                nll[s, start : start + batch] = token_nll(logits, ids).double()
                kl[s, start : start + batch] = token_kl(reference, logits).double()
                bar.update(ids.shape[0])
    return nll, kl


def kept_ladder_scores(
    engine: Engine,
    windows: torch.Tensor,
    ladder: list[list[int]],
    path: Path | None,
    model_id: str,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ladder_scores`, kept in `path` (safetensors) between runs. Scoring a ladder is the long part of an oracle
    (~18 min on SmolLM2), so every schedule's scores are stored for this model (`model_id`, its calibration, K/V
    rule and head) and these windows, and a later run scores only the schedules it has not seen; a file made for
    anything else is replaced."""
    identity = [model_id, engine.scales.tolist(), str(engine.kv_rule), engine.backbone.head_precision, windows.tolist()]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    kept: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    if path is not None and path.exists():
        with safe_open(path, "pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") == key:
                nll, kl = fh.get_tensor("nll"), fh.get_tensor("kl")
                kept = {tuple(s): (nll[i], kl[i]) for i, s in enumerate(json.loads(meta["ladder"]))}
    missing = [s for s in ladder if tuple(s) not in kept]
    if missing:
        nll, kl = ladder_scores(engine, windows, missing, progress=progress)
        kept |= {tuple(s): (nll[i], kl[i]) for i, s in enumerate(missing)}
        if path is not None:
            every = list(kept)
            tensors = {name: torch.stack([kept[s][i] for s in every]) for i, name in enumerate(("nll", "kl"))}
            with atomic_path(Path(path)) as tmp:
                save_file(tensors, tmp, metadata={"key": key, "ladder": json.dumps([list(s) for s in every])})
    return torch.stack([kept[tuple(s)][0] for s in ladder]), torch.stack([kept[tuple(s)][1] for s in ladder])


def lagrangian_choice(loss: torch.Tensor, cost: torch.Tensor, budget: float) -> torch.Tensor:
    """Per unit (rows of `loss`, (units, options)), the option minimising loss + lambda * cost, for the smallest
    lambda whose mean cost is within `budget`; raises where even the cheapest options exceed it."""
    if float(cost.min()) > budget + 1e-9:
        raise DashskipError(f"no schedule is as cheap as {budget:.3f} full layers per token")

    def pick(lam: float) -> torch.Tensor:
        return (loss + lam * cost).argmin(-1)

    lo, hi = 0.0, 1.0
    while float(cost[pick(hi)].mean()) > budget + 1e-9:
        lo, hi = hi, hi * 2
        if hi > 1e12:  # ties at the cheapest cost: take the cheapest outright
            return torch.full((loss.shape[0],), int(cost.argmin()))
    if float(cost[pick(lo)].mean()) <= budget + 1e-9:
        return pick(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if float(cost[pick(mid)].mean()) <= budget + 1e-9 else (mid, hi)
    return pick(hi)


@dataclass
class OracleResult:
    """One oracle at one budget: per-window mean NLL over the same windows, and the compute ratio it ran at."""

    granularity: Granularity
    target: float
    ratio: float
    window_nll: list[float]


def oracle(
    nll: torch.Tensor,
    cost: torch.Tensor,
    num_layers: int,
    target: float,
    granularity: Granularity,
    criterion: torch.Tensor | None = None,
) -> OracleResult:
    """The choice of schedules with hindsight at compute ratio >= `target` that minimises `criterion` (the NLL
    where none is given), scored by its NLL (see the module docstring).

    `nll`, `criterion`: (schedules, windows, tokens) from `ladder_scores`; `cost`: each schedule's cost per token
    in full layers.
    """
    budget = num_layers / target
    criterion = nll if criterion is None else criterion
    schedules, windows, tokens = nll.shape
    if granularity == "schedule":  # one unit: the best feasible schedule outright, not a Lagrangian's hull point
        feasible = torch.where(cost.double() <= budget + 1e-9, criterion.mean((1, 2)), torch.inf)
        if not torch.isfinite(feasible).any():
            raise DashskipError(f"no schedule is as cheap as {budget:.3f} full layers per token")
        choice = feasible.argmin().expand(windows, tokens)
    elif granularity == "window":
        choice = lagrangian_choice(criterion.mean(-1).T, cost.double(), budget)[:, None].expand(windows, tokens)
    else:
        flat = criterion.permute(1, 2, 0).reshape(-1, schedules)
        choice = lagrangian_choice(flat, cost.double(), budget).reshape(windows, tokens)
    picked = nll.permute(1, 2, 0).gather(-1, choice[..., None]).squeeze(-1)
    ratio = num_layers / float(cost.double()[choice].mean())
    return OracleResult(granularity, target, ratio, picked.mean(-1).tolist())
