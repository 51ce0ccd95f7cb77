"""Token generation on the engine, in gpt-fast's shape: `prefill`, `decode_one_token`, `decode_n_tokens`,
`speculative_decode`, over explicit sessions, with one `GenerationConfig`.

`generate` mirrors transformers' `generate` semantics (left padding, finished rows padded with `pad_token_id`) so
the all-full path is token-identical to it, and reports the states of the path that produced each token and the
compute ratio. Lossless mode (`generate_lossless`, `speculative_decode`): a cheap path of the same model drafts
tokens, the full model verifies them in one step. Self-speculative decoding (LayerSkip, SWIFT, Draft&Verify
draft with fixed layer sets); here the draft path is any decider of the engine, DASH's learned per-token policy
included. One round:

1. draft up to k tokens one by one with the draft decider (their K/V, partial, go into the cache);
2. truncate the cache to where the round started and run the last accepted token plus the drafts through every
   layer in full, in one step: the verifier's full K/V overwrite the drafts' partial ones;
3. keep the longest prefix the full model agrees with (greedy: equal argmax; sampling: speculative-sampling
   acceptance, so the output distribution is the full model's), then one token of the full model's own; the
   cache is truncated to the kept prefix, which drops the rejected positions without recomputing any kept one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from dashskip.core.costs import CostTable
from dashskip.core.decisions import Decider
from dashskip.core.states import State, registered
from dashskip.errors import DashskipError
from dashskip.runtime.engine import Engine, Session, StepResult

# Below this temperature sampling is decoded greedily: its limit as T -> 0, without logits / T overflowing.
MIN_TEMPERATURE = 1e-5


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop, as transformers' `GenerationConfig` names it."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise DashskipError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature > 0 or self.temperature != self.temperature:
            raise DashskipError(
                f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy decoding"
            )
        if not 0 < self.top_p <= 1:
            raise DashskipError(f"top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def build(cls, config: GenerationConfig | None, settings: dict[str, Any]) -> GenerationConfig:
        """`config` with `settings` (its field names) applied, as transformers' `generate(**kwargs)` does."""
        unknown = set(settings) - {f.name for f in fields(cls)}
        if unknown:
            raise DashskipError(f"unknown generation settings {sorted(unknown)}")
        return replace(config or cls(), **settings)

    @property
    def sampling(self) -> bool:
        return self.do_sample and self.temperature >= MIN_TEMPERATURE

    @property
    def eos(self) -> list[int]:
        eos = self.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    @property
    def pad(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos[0] if self.eos else 0


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


def next_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) tokens: argmax, or a draw from the warped distribution."""
    if not config.sampling:
        return logits.argmax(-1)
    probs = warp_logits(logits.float(), config.temperature, config.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_tokens(
    engine: Engine,
    result: StepResult,
    configs: Sequence[GenerationConfig],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Each row's next token from a step's last position, each row sampled with its own settings and generator
    (a server's requests in one batch)."""
    logits = engine.backbone.logits(result.hidden[:, -1]).float()
    greedy = logits.argmax(-1).tolist() if not all(c.sampling for c in configs) else []  # greedy rows in one call
    return [int(next_token(logits[i : i + 1], config, generator)[0]) if config.sampling else greedy[i]
            for i, (config, generator) in enumerate(zip(configs, generators, strict=True))]  # fmt: skip


def prefill(
    engine: Engine,
    session: Session,
    input_ids: torch.Tensor,
    decider: Decider | None = None,
    attention_mask: torch.Tensor | None = None,
    last: bool = True,
) -> StepResult:
    """Every prompt token through the layers (or a chunk of them: `last` False while more follow); the last
    position's hidden state gives the first new token."""
    if input_ids.shape[1] == 0:
        raise DashskipError("empty prompt: give at least one token")
    return engine.step(input_ids, session, decider, attention_mask, produces=last)


def decode_one_token(engine: Engine, session: Session, token: torch.Tensor, decider: Decider | None) -> StepResult:
    """One new token per row, (batch,), at the session's next position."""
    batch = token.shape[0]
    return engine.step(token[:, None], session, decider, torch.ones(batch, 1, dtype=torch.long))


StopFn = Callable[[int, list[int]], bool]  # (row, its new tokens so far) -> stop this row


@dataclass
class Decoded:
    """New tokens per row (each list ends at its EOS or stop), and the states of the path behind each token."""

    tokens: list[list[int]]
    states: torch.Tensor  # (batch, max new, layers); rows past their end repeat nothing meaningful
    lengths: list[int]


def decode_n_tokens(
    engine: Engine,
    session: Session,
    last: StepResult,
    config: GenerationConfig,
    decider: Decider | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    stop: StopFn | None = None,
) -> Decoded:
    """Up to `config.max_new_tokens` tokens per row after the step `last`; a row ends at EOS or when `stop` says so,
    and is padded with `pad_token_id` until every row has ended. `on_token` gets each step's (batch,) tokens."""
    batch = last.hidden.shape[0]
    eos = torch.tensor(config.eos, dtype=torch.long)
    produced: list[list[int]] = [[] for _ in range(batch)]
    paths = [last.states[:, -1]]
    running = torch.ones(batch, dtype=torch.bool)
    result = last
    for index in range(config.max_new_tokens):
        token = next_token(engine.backbone.logits(result.hidden[:, -1]).float(), config, generator)
        token = torch.where(running, token, torch.full_like(token, config.pad))
        if on_token is not None:
            on_token(token)
        for r in running.nonzero().flatten().tolist():
            produced[r].append(int(token[r]))
            if (len(eos) and int(token[r]) in config.eos) or (stop is not None and stop(r, produced[r])):
                running[r] = False
        if not bool(running.any()) or index == config.max_new_tokens - 1:
            break
        result = decode_one_token(engine, session, token, decider)
        paths.append(result.states[:, -1])
    return Decoded(produced, torch.stack(paths, dim=1), [len(p) for p in produced])


@dataclass
class GenerateOutput:
    """What `generate` returns: the sequences (prompt + new tokens) and how each new token was computed."""

    sequences: torch.Tensor  # (batch, prompt + new)
    states: torch.Tensor  # (batch, new, layers): the states of the path that produced each new token
    compute_ratio: float  # layers / mean executed cost per produced token, from the cost table
    lengths: list[int] = field(default_factory=list)  # new tokens of each row up to its end (EOS included)
    speedup: float = 1.0  # decode wall clock against the full path (same head), as the cost table predicts it
    speculative: SpeculativeStats | None = None  # lossless mode: what the drafting achieved

    def stats(self) -> dict[str, Any]:
        flat = self.states.reshape(-1, self.states.shape[-1]).long()
        total = max(flat.numel(), 1)
        return {
            "predicted_speedup": round(self.speedup, 4),
            "compute_ratio": round(self.compute_ratio, 4),
            "tokens": int(self.states.shape[0] * self.states.shape[1]),
            "state_fractions": {s.name: round(float((flat == s.code).sum()) / total, 4) for s in registered()},
            "layers_per_token": [row.tolist() for row in self.states[0].long()],
            **({"lossless": self.speculative.as_dict()} if self.speculative is not None else {}),
        }


def produced_mask(states: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(batch, new) True where a row really produced the token (not padding after its end)."""
    steps = torch.arange(states.shape[1])[None, :]
    return steps < torch.tensor(lengths)[:, None]


def generate(
    engine: Engine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    decider: Decider | None = None,
    config: GenerationConfig | None = None,
    *,
    streamer: Any = None,
    costs: CostTable | None = None,
    generator: torch.Generator | None = None,
    stop: StopFn | None = None,
    **settings: Any,
) -> GenerateOutput:
    """Prefill the prompt, then decode; `settings` are `GenerationConfig` fields (max_new_tokens=..., ...)."""
    config = GenerationConfig.build(config, settings)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    batch, prompt_len = input_ids.shape
    session = engine.new_session(batch, capacity=prompt_len + config.max_new_tokens)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    first = prefill(engine, session, input_ids, decider, attention_mask)
    on_token = None if streamer is None else (lambda token: streamer.put(token.cpu()))
    decoded = decode_n_tokens(engine, session, first, config, decider, generator, on_token, stop)
    if streamer is not None:
        streamer.end()
    width = decoded.states.shape[1]
    new = torch.full((batch, width), config.pad, dtype=torch.long)
    for r, tokens in enumerate(decoded.tokens):
        new[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    costs = costs or CostTable.default()
    real = decoded.states[produced_mask(decoded.states, decoded.lengths)]
    counted = real if real.numel() else decoded.states
    speedup = costs.speedup(counted, engine.backbone.head_precision, decider.traits.decisions if decider else None)
    return GenerateOutput(torch.cat([input_ids, new], dim=1), decoded.states, costs.compute_ratio(counted),
                          decoded.lengths, speedup)  # fmt: skip


# ---------------------------------------------------------------- lossless mode


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


def speculative_decode(
    engine: Engine,
    session: Session,
    first: int,
    draft: Decider,
    config: GenerationConfig,
    length: DraftLength,
    generator: torch.Generator | None = None,
    on_token: Callable[[int], None] | None = None,
    draft_engine: Engine | None = None,
    draft_head: str = "int8",
) -> tuple[list[int], SpeculativeStats]:
    """Tokens after `first` (the prefill's, included) until EOS or `max_new_tokens`, each the full model's.

    `draft_engine` may share the backbone with another K/V rule: a fixed skipped set never reads its own skipped
    layers' K/V, so the free 'copy' rule serves it. Drafts go through the LM head at `draft_head` precision
    (INT8: ~3x cheaper than fp32 and, by construction, harmless: the verifier uses the engine's own head).
    """
    drafter = draft_engine or engine
    bb = engine.backbone
    eos = set(config.eos)
    sample = config.sampling
    stats = SpeculativeStats()
    new = [first]

    def probs(hidden: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """The warped distribution when sampling; greedy: the plain softmax (its argmax, and the draft's
        confidence for the adaptive length)."""
        logits = bb.logits(hidden, precision).float()
        return (warp_logits(logits, config.temperature, config.top_p) if sample else logits).softmax(-1)

    def emit(token: int) -> None:
        new.append(token)
        if on_token is not None:
            on_token(token)

    while len(new) < config.max_new_tokens and new[-1] not in eos:
        start = session.length
        drafts, draft_probs = [], []
        token = new[-1]
        while length.keep_drafting(len(drafts), float(draft_probs[-1].max()) if draft_probs else 1.0):
            if len(new) + len(drafts) >= config.max_new_tokens:
                break
            q = probs(drafter.step(torch.tensor([[token]]), session, draft).hidden[0, -1], draft_head)
            token = int(torch.multinomial(q, 1, generator=generator)) if sample else int(q.argmax())
            drafts.append(token)
            draft_probs.append(q)
        session.truncate(start)  # the verifier overwrites the drafts' K/V from here
        full_probs = probs(engine.step(torch.tensor([[new[-1], *drafts]]), session).hidden[0])
        accepted, bonus = _accept(drafts, draft_probs, full_probs, generator, sample)
        session.truncate(start + accepted + 1)  # keep the last token and the accepted drafts
        stats.rounds += 1
        stats.drafted += len(drafts)
        stats.accepted += accepted
        stats.accepted_per_round.append(accepted)
        length.update(accepted, len(drafts))
        for t in [*drafts[:accepted], bonus]:
            if len(new) >= config.max_new_tokens:
                break
            emit(t)
            if t in eos:
                break
    return new, stats


def generate_lossless(
    engine: Engine,
    input_ids: torch.Tensor,
    draft: Decider,
    config: GenerationConfig | None = None,
    *,
    streamer: Any = None,
    generator: torch.Generator | None = None,
    length: DraftLength | None = None,
    draft_engine: Engine | None = None,
    draft_head: str = "int8",
    **settings: Any,
) -> tuple[GenerateOutput, SpeculativeStats]:
    """Generate with the full model's output, drafting with `draft` (on `draft_engine`, default `engine`); the
    drafting's statistics come back beside the output and in it (`GenerateOutput.speculative`)."""
    config = GenerationConfig.build(config, settings)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise DashskipError("lossless mode runs one sequence at a time; give a batch of 1 (or loop over prompts)")
    length = length or DraftLength()
    session = engine.new_session(1, capacity=input_ids.shape[1] + config.max_new_tokens + length.k + 1)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    hidden = prefill(engine, session, input_ids).hidden[0, -1]
    first = int(next_token(engine.backbone.logits(hidden[None]).float(), config, generator)[0])
    on_token = None if streamer is None else (lambda t: streamer.put(torch.tensor([t])))
    if on_token is not None:
        on_token(first)
    new, stats = speculative_decode(
        engine, session, first, draft, config, length, generator, on_token, draft_engine, draft_head
    )
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([input_ids, torch.tensor([new])], dim=1)
    # Every kept token is the full model's: its path is the verifier's, all layers in full.
    states = torch.full((1, len(new), engine.backbone.num_layers), int(State.FULL), dtype=torch.int8)
    return GenerateOutput(sequences, states, 1.0, [len(new)], speculative=stats), stats
