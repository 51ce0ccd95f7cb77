"""Token generation on the engine: greedy or sampled, with per-token state statistics.

Mirrors transformers' `generate` semantics (left padding, finished rows padded
with `pad_token_id`) so the all-full path is token-identical to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dashskip.decisions import Decider
from dashskip.engine import Engine
from dashskip.errors import DashskipError
from dashskip.profiling import CostTable


@dataclass
class GenerateOutput:
    """What `generate` returns: the sequences (prompt + new tokens) and how each new token was computed."""

    sequences: torch.Tensor  # (batch, prompt + new)
    states: torch.Tensor  # (batch, new, layers): the states of the path that produced each new token
    compute_ratio: float  # layers / mean executed cost per produced token, from the cost table

    def stats(self) -> dict[str, Any]:
        flat = self.states.reshape(-1, self.states.shape[-1]).long()
        total = max(flat.shape[0], 1)
        return {
            "compute_ratio": round(self.compute_ratio, 4),
            "tokens": int(self.states.shape[0] * self.states.shape[1]),
            "state_fractions": {
                name: round(float((flat == s).sum()) / (total * flat.shape[1]), 4)
                for name, s in (("skip", 0), ("int4", 1), ("int8", 2), ("full", 4))
            },
            "layers_per_token": [row.tolist() for row in self.states[0].long()],
        }


def warp_logits(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Temperature and nucleus (top-p) filtering, as transformers applies them; dropped tokens get -inf."""
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = warp_logits(logits, temperature, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_generation_args(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise DashskipError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature > 0:
        raise DashskipError(f"temperature must be > 0, got {temperature}; use do_sample=False for greedy decoding")
    if not 0 < top_p <= 1:
        raise DashskipError(f"top_p must be in (0, 1], got {top_p}")


def generate(
    engine: Engine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    decider: Decider | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    costs: CostTable | None = None,
    generator: torch.Generator | None = None,
) -> GenerateOutput:
    check_generation_args(max_new_tokens, temperature, top_p)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.shape[1] == 0:
        raise DashskipError("empty prompt: give at least one token")
    batch, prompt_len = input_ids.shape
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    session = engine.new_session(batch, capacity=prompt_len + max_new_tokens)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    result = engine.step(input_ids, session, decider, attention_mask)
    paths = [result.states[:, -1]]
    sequences = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool)
    for index in range(max_new_tokens):
        logits = engine.backbone.logits(result.hidden[:, -1]).float()
        token = _sample(logits, temperature, top_p, generator) if do_sample else logits.argmax(-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        if streamer is not None:
            streamer.put(token.cpu())
        if len(eos):
            unfinished &= ~torch.isin(token, eos)
        if not bool(unfinished.any()) or index == max_new_tokens - 1:
            break
        result = engine.step(token[:, None], session, decider, torch.ones(batch, 1, dtype=torch.long))
        paths.append(result.states[:, -1])
    if streamer is not None:
        streamer.end()
    states = torch.stack(paths, dim=1)
    costs = costs or CostTable.default()
    return GenerateOutput(sequences, states, costs.compute_ratio(states))
