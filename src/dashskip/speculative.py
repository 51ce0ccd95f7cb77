"""Lossless mode: a cheap path of the same model drafts tokens, the full model verifies them in one step.

Self-speculative decoding (LayerSkip, SWIFT, Draft&Verify draft with fixed layer sets); here the draft path is
any decider of the engine, DASH's learned per-token policy included. One round:

1. draft up to k tokens one by one with the draft decider (their K/V, partial, go into the cache);
2. rewind the cache to where the round started and run the last accepted token plus the drafts through every
   layer in full, in one step: the verifier's full K/V overwrite the drafts' partial ones;
3. keep the longest prefix the full model agrees with (greedy: equal argmax; sampling: speculative-sampling
   acceptance, so the output distribution is the full model's), then one token of the full model's own;
   the cache length is set to the kept prefix, which rolls back the rejected positions without recomputing
   any accepted one.

Greedy output is token-identical to full greedy decoding; sampled output has the full model's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dashskip.decisions import Decider
from dashskip.engine import Engine
from dashskip.errors import DashskipError
from dashskip.generation import GenerateOutput, check_generation_args, warp_logits
from dashskip.states import State


@dataclass
class SpeculativeStats:
    """What the drafting achieved: acceptance rate and mean accepted length per verification round."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
            "mean_accepted_length": round(self.accepted / self.rounds, 3) if self.rounds else 0.0,
            "tokens_per_round": round((self.accepted + self.rounds) / self.rounds, 3) if self.rounds else 0.0,
        }


@dataclass
class DraftLength:
    """How many tokens to draft: a fixed k, or adaptive (stop when the draft's own confidence drops below
    `confidence`, and draft at most one more than the last round accepted, up to `k`)."""

    k: int = 4
    adaptive: bool = True
    confidence: float = 0.4
    current: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise DashskipError(f"draft length k must be >= 1, got {self.k}")
        if not 0 <= self.confidence < 1:
            raise DashskipError(f"draft confidence threshold must be in [0, 1), got {self.confidence}")
        self.current = self.k

    def keep_drafting(self, drafted: int, probability: float) -> bool:
        if drafted >= self.current:
            return False
        return not self.adaptive or probability >= self.confidence

    def update(self, accepted: int, drafted: int) -> None:
        if self.adaptive:
            self.current = min(self.k, accepted + 1 + (accepted == drafted))


def _accept(
    drafts: list[int], draft_probs: list[torch.Tensor], full_probs: torch.Tensor, generator, sample: bool
) -> tuple[int, int]:
    """(number of drafts accepted, the full model's next token) for one round.

    full_probs (len(drafts) + 1, vocab): the verifier's distribution after each prefix. Greedy compares argmax;
    sampling accepts draft d with probability min(1, p(d) / q(d)) and otherwise samples from max(0, p - q).
    """
    for i, token in enumerate(drafts):
        p = full_probs[i]
        if not sample:
            if int(p.argmax()) != token:
                return i, int(p.argmax())
            continue
        q = draft_probs[i]
        ratio = float(p[token] / q[token].clamp(min=1e-20))
        if torch.rand((), generator=generator) >= ratio:
            residual = (p - q).clamp(min=0)
            residual = residual / residual.sum() if float(residual.sum()) > 0 else p
            return i, int(torch.multinomial(residual, 1, generator=generator))
    p = full_probs[len(drafts)]
    token = int(torch.multinomial(p, 1, generator=generator)) if sample else int(p.argmax())
    return len(drafts), token


def generate_lossless(
    engine: Engine,
    input_ids: torch.Tensor,
    draft: Decider,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    streamer: Any = None,
    generator: torch.Generator | None = None,
    length: DraftLength | None = None,
    draft_engine: Engine | None = None,
    draft_head: str = "int8",
) -> tuple[GenerateOutput, SpeculativeStats]:
    """Generate with the full model's output, drafting with `draft` (on `draft_engine`, default `engine`).

    `draft_engine` may share the backbone with another K/V rule: a fixed skipped set never reads its own skipped
    layers' K/V, so the free 'copy' rule serves it. Drafts go through the LM head at `draft_head` precision
    (INT8: ~3x cheaper than fp32 and, by construction, harmless: the verifier uses the engine's own head).
    """
    check_generation_args(max_new_tokens, temperature, top_p)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise DashskipError("lossless mode runs one sequence at a time; give a batch of 1 (or loop over prompts)")
    if input_ids.shape[1] == 0:
        raise DashskipError("empty prompt: give at least one token")
    length = length or DraftLength()
    drafter = draft_engine or engine
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    bb = engine.backbone
    session = engine.new_session(1, capacity=input_ids.shape[1] + max_new_tokens + length.k + 1)
    stats = SpeculativeStats()
    if streamer is not None:
        streamer.put(input_ids.cpu())

    def probs(hidden: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        logits = bb.logits(hidden, precision).float()
        return warp_logits(logits, temperature, top_p).softmax(-1) if do_sample else logits

    def pick(p: torch.Tensor) -> int:
        return int(torch.multinomial(p, 1, generator=generator)) if do_sample else int(p.argmax())

    prefill = engine.step(input_ids, session)
    new: list[int] = [pick(probs(prefill.hidden[0, -1]))]
    if streamer is not None:
        streamer.put(torch.tensor(new))
    while len(new) < max_new_tokens and new[-1] not in eos:
        start = session.cache.length
        drafts, draft_probs = [], []
        token = new[-1]
        while length.keep_drafting(len(drafts), float(draft_probs[-1].max()) if draft_probs else 1.0):
            if len(new) + len(drafts) >= max_new_tokens:
                break
            step = drafter.step(torch.tensor([[token]]), session, draft)
            q = probs(step.hidden[0, -1], draft_head)
            q = q if do_sample else q.softmax(-1)
            token = pick(q) if do_sample else int(q.argmax())
            drafts.append(token)
            draft_probs.append(q)
        session.cache.length = start  # the verifier overwrites the drafts' K/V from here
        verify = engine.step(torch.tensor([[new[-1], *drafts]]), session)
        full_probs = probs(verify.hidden[0])
        accepted, bonus = _accept(drafts, draft_probs, full_probs, generator, do_sample)
        session.cache.length = start + accepted + 1  # keep the last token and the accepted drafts
        stats.rounds += 1
        stats.drafted += len(drafts)
        stats.accepted += accepted
        stats.accepted_per_round.append(accepted)
        length.update(accepted, len(drafts))
        for t in [*drafts[:accepted], bonus]:
            if len(new) >= max_new_tokens:
                break
            new.append(t)
            if streamer is not None:
                streamer.put(torch.tensor([t]))
            if t in eos:
                break
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([input_ids, torch.tensor([new])], dim=1)
    # Every kept token is the full model's: its path is the verifier's, all layers in full.
    states = torch.full((1, len(new), bb.num_layers), int(State.FULL), dtype=torch.int8)
    return GenerateOutput(sequences, states, 1.0), stats
