"""Quality measurements on the engine; every number comes with its sample size and standard error."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from dashskip.data import leading_bos, with_bos
from dashskip.decisions import Decider
from dashskip.engine import Engine
from dashskip.errors import DashskipError
from dashskip.profiling import CostTable
from dashskip.training import token_nll


@dataclass
class PerplexityResult:
    ppl: float
    ppl_se: float  # delta method: ppl * SE(mean NLL), SE over windows
    nll: float
    windows: int
    tokens: int
    compute_ratio: float
    context: int

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def perplexity_windows(tokenizer, text: str, context: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `context` tokens over the whole text, in order.

    Where the tokenizer starts texts with BOS (Gemma), each window is BOS + `context - 1` text tokens.
    """
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    bos = leading_bos(tokenizer)
    content = context - (bos is not None)
    count = ids.numel() // content
    if count == 0:
        raise DashskipError(f"text has {ids.numel()} tokens, fewer than one {context}-token window")
    if limit is not None:
        count = min(count, limit)
    return with_bos(ids[: count * content].view(count, content), bos)


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
    per_window, ratios, tokens = [], [], 0
    bb = engine.backbone
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
        ids = windows[start : start + batch_size]
        result = engine.step(ids, engine.new_session(*ids.shape), decider)
        nll = token_nll(bb.logits(result.hidden), ids)
        per_window.extend(nll.mean(-1).tolist())
        ratios.append((costs.compute_ratio(result.states), ids.numel()))
        tokens += nll.numel()
    nlls = torch.tensor(per_window, dtype=torch.float64)
    mean = float(nlls.mean())
    se = float(nlls.std(unbiased=True) / math.sqrt(len(nlls))) if len(nlls) > 1 else float("nan")
    # The compute ratio over all scored tokens is L / mean cost; average the costs, not the ratios.
    n_layers = bb.num_layers
    mean_cost = sum(n_layers / r * w for r, w in ratios) / sum(w for _, w in ratios)
    return PerplexityResult(
        ppl=math.exp(mean),
        ppl_se=math.exp(mean) * se,
        nll=mean,
        windows=len(nlls),
        tokens=tokens,
        compute_ratio=n_layers / mean_cost,
        context=windows.shape[1],
    )
