"""Quality measurements on the engine; every number comes with its sample size and standard error."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from dashskip.core.costs import CostTable
from dashskip.core.decisions import Decider
from dashskip.core.losses import token_nll
from dashskip.data import leading_bos, text_ids, with_bos
from dashskip.errors import DashskipError
from dashskip.runtime.engine import Engine


@dataclass
class PerplexityResult:
    ppl: float
    ppl_se: float  # delta method: ppl * SE(mean NLL), SE over windows
    nll: float
    windows: int
    tokens: int
    compute_ratio: float
    context: int
    window_nlls: list[float] = field(default_factory=list)  # per window, for paired comparisons over the same ones

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items() if k != "window_nlls"}


def perplexity_windows(tokenizer, text: str, context: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `context` tokens over the whole text, in order.

    Where the tokenizer starts texts with BOS (Gemma), each window is BOS + `context - 1` text tokens.
    """
    ids = text_ids(tokenizer, text)
    bos = leading_bos(tokenizer)
    content = context - (bos is not None)
    count = ids.numel() // content
    if count == 0:
        raise DashskipError(f"text has {ids.numel()} tokens, fewer than one {context}-token window")
    if limit is not None:
        count = min(count, limit)
    return with_bos(ids[: count * content].clone().view(count, content), bos)  # not a view of the kept ids


def executed_cost(
    costs: CostTable, states: torch.Tensor, decider: Decider | None, mask: torch.Tensor | None = None
) -> tuple[float, int]:
    """Summed executed cost (in full layers, decode cost table) of the (masked) tokens' paths, and their count.

    The compute ratio over many tokens is L * tokens / summed cost: costs add up, ratios do not. A static
    sublayer plan (AdaSkip) leaves every state full; its own ratio then sets each token's cost.
    """
    per_token = costs.token_costs(states)
    if mask is not None:
        per_token = per_token[mask]
    plan_ratio = decider.traits.plan_ratio if decider is not None else None
    if plan_ratio is not None:
        per_token = torch.full_like(per_token, states.shape[-1] / plan_ratio)
    return float(per_token.sum()), int(per_token.numel())


@torch.no_grad()
def window_nll(
    engine: Engine, ids: torch.Tensor, decider: Decider | None, costs: CostTable
) -> tuple[list[float], float, int]:
    """Mean next-token NLL of each window (batch, tokens) scored on its own; the windows' summed executed cost and
    the number of tokens it covers (every token, the last too: it ran through the layers)."""
    result = engine.score(ids, decider)
    nll = token_nll(engine.backbone.logits(result.hidden), ids)
    return nll.mean(-1).tolist(), *executed_cost(costs, result.states, decider)


@torch.no_grad()
def perplexity(
    engine: Engine,
    windows: torch.Tensor,
    decider: Decider | None = None,
    costs: CostTable | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of the windows (each scored on its own, every token with its own per-layer states)."""
    costs = costs or CostTable.default()
    per_window, total_cost, run = [], 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
        nlls, cost, count = window_nll(engine, windows[start : start + batch_size], decider, costs)
        per_window.extend(nlls)
        total_cost += cost
        run += count
    nlls = torch.tensor(per_window, dtype=torch.float64)
    mean = float(nlls.mean())
    se = float(nlls.std(unbiased=True) / math.sqrt(len(nlls))) if len(nlls) > 1 else float("nan")
    return PerplexityResult(
        ppl=math.exp(mean),
        ppl_se=math.exp(mean) * se,
        nll=mean,
        windows=len(nlls),
        tokens=windows.shape[0] * (windows.shape[1] - 1),
        compute_ratio=engine.backbone.num_layers * run / max(total_cost, 1e-9),
        context=windows.shape[1],
        window_nlls=per_window,
    )
