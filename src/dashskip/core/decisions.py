"""The pluggable decision function: which state each token runs each layer in.

The engine asks a `Decider` once per layer with the hidden state entering that layer; for the first and last
layer the answer is ignored (they always run in full; an exit-style method may skip the last), but the call
lets an asynchronous policy look ahead. It may answer one state for the whole step (an `int`: the fast path, no
per-row grouping) or a (batch, tokens) tensor of states. DASH's learned policy, the baselines and the fixed
schedules below all implement this. A decider holds the state of the sequences it decides for (a policy's
pending decision, a controller's running cost): one instance per request, never shared between requests.

`Traits` let a method change how the engine runs the states, each off by default: its own skip scales, a static
plan of skipped attention / MLP sublayers (AdaSkip), permission to skip the last layer (early exit). A wrapper
(`Wrapper`) changes which states run, not how: it reads its traits from the decider it wraps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from dashskip.core.context import StateChoice
from dashskip.core.states import State, check_state, check_state_tensor, parse, registered, spec
from dashskip.errors import DashskipError


@dataclass(frozen=True)
class SublayerSkip:
    """A layer whose attention and/or MLP every token of every step skips (None: that sublayer runs).

    A skipped sublayer's residual-stream output is its input times the scale: `mid = attn * x`, `out = mlp * mid`.
    """

    attn: float | None = None
    mlp: float | None = None


@dataclass(frozen=True)
class Traits:
    """How a method runs its states, where it differs from the engine's defaults."""

    skip_scales: torch.Tensor | None = None  # scales it was calibrated with; None: the engine's own
    sublayers: dict[int, SublayerSkip] = field(default_factory=dict)  # layers with statically skipped sublayers
    may_skip_last: bool = False  # only exit-style methods may skip the last layer (METHOD.md)
    # The first and last layers run the states given (quantized; a skip there runs in full). Rows of a batch must
    # agree on it (`same_as`), as on every trait.
    quantized_outer: bool = False
    plan_ratio: float | None = None  # a sublayer plan's compute ratio, which the (all full) states cannot show
    decisions: str | None = None  # the cost table's key for what this decider's answers cost a token (a policy's)

    def same_as(self, other: Traits) -> bool:
        scales_equal = (self.skip_scales is None and other.skip_scales is None) or (
            self.skip_scales is not None
            and other.skip_scales is not None
            and torch.equal(self.skip_scales, other.skip_scales)
        )
        return scales_equal and (self.sublayers, self.may_skip_last, self.quantized_outer, self.plan_ratio) == (
            other.sublayers,
            other.may_skip_last,
            other.quantized_outer,
            other.plan_ratio,
        )


@dataclass
class StepInfo:
    """What a decider may know about the step being run."""

    positions: torch.Tensor  # (batch, tokens) position ids
    prefill: bool  # the sequence's first step (a new sequence: a controller starts over)
    num_layers: int
    produces: bool = True  # the step's last position gives a new token (not a prompt chunk with more to come)

    def rows(self, index: slice) -> StepInfo:
        return replace(self, positions=self.positions[index])


class Decider:
    """Base class: every layer in full."""

    traits: Traits = Traits()

    def begin(self, step: StepInfo) -> None:
        """Called before the first layer of every step."""

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        return int(State.FULL)

    def planned(self, num_layers: int) -> list[int] | None:
        """Every layer's state for every row of the coming step, where it is known before the step runs (a fixed
        schedule): a runner may then run the step's layers without asking layer by layer (the engine: as one
        compiled call). None: asked layer by layer. The base decider answers for itself only (all full); a
        subclass that decides per layer says None unless it overrides this too."""
        if type(self).__call__ is Decider.__call__:
            return [int(State.FULL)] * num_layers
        return None

    def end(self, states: torch.Tensor) -> None:
        """Called after every step with the states that ran, (batch, tokens, layers) (a controller's feedback)."""

    def again(self, states: torch.Tensor, valid: torch.Tensor | None) -> bool:
        """After scoring a whole window in one step (`Engine.score`): whether to score it again because a
        controller moved its operating point toward the one asked. `valid` (batch, tokens): real tokens."""
        return False

    @classmethod
    def fuse(cls, rows: Sequence[Decider]) -> Decider | None:
        """One decider answering for every row of a step in one call per layer, where row r's own decider is
        `rows[r]` (of this kind, or a plain `Decider`: that row in full), each row decided as it would be alone;
        None where this kind cannot (then `PerRow` asks each row's decider in turn)."""
        return None


def as_choice(answer: StateChoice, batch: int, tokens: int) -> StateChoice:
    """A decider's answer checked: one state, or a (batch, tokens) tensor of states (one state if all agree)."""
    if not isinstance(answer, torch.Tensor):
        return check_state(answer)
    if answer.shape != (batch, tokens):
        raise DashskipError(f"decider returned states of shape {tuple(answer.shape)}, expected {(batch, tokens)}")
    check_state_tensor(answer)
    first = answer.reshape(-1)[0]
    return int(first) if bool((answer == first).all()) else answer


def decide_and_run(
    x: torch.Tensor,
    decider: Decider,
    num_layers: int,
    run: Callable[[int, StateChoice, torch.Tensor], torch.Tensor],
    held_full: Sequence[int] = (),
    run_planned: Callable[[list[int], torch.Tensor], torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decision loop, the one every runner drives (the engine; vLLM's model, its tokens as rows of one):
    for each layer, ask `decider` with the hidden state entering it, then `run(i, choice, x)` the layer in the
    states chosen. Every layer is shown to the decider (an asynchronous policy decides layer i+1 while layer i
    runs), but the first layer always runs in full whatever it answers, and so does the last unless the decider
    exits early, and so do `held_full` (a plan's layers). `x`: (batch, tokens, hidden). Returns the hidden state
    after the last layer and the (batch, tokens, layers) int8 states that ran. `run_planned(states, x)`: where the
    decider knows every layer's state before the step (`Decider.planned`), the runner may run them all at once
    (None where it cannot, then the layers run one by one)."""
    batch, tokens = x.shape[:2]
    traits = decider.traits
    outer = {0} if traits.may_skip_last else {0, num_layers - 1}
    forced = {*held_full} if traits.quantized_outer else {*outer, *held_full}
    unskipped = outer if traits.quantized_outer else set()  # run the state given, but never a skip
    planned = None if run_planned is None else decider.planned(num_layers)
    if planned is not None:
        chosen = [int(State.FULL) if i in forced else planned[i] for i in range(num_layers)]
        chosen = [unskip(s) if i in unskipped else s for i, s in enumerate(chosen)]
        out = run_planned(chosen, x)
        if out is not None:
            return out, torch.tensor(chosen, dtype=torch.int8).expand(batch, tokens, num_layers).clone()
    states = torch.full((batch, tokens, num_layers), int(State.FULL), dtype=torch.int8)
    previous: StateChoice = int(State.FULL)
    for i in range(num_layers):
        answer = decider(i, x, previous)
        choice = int(State.FULL) if i in forced else as_choice(answer, batch, tokens)
        if i in unskipped:
            choice = unskip(choice)
        x = run(i, choice, x)
        states[:, :, i] = choice if isinstance(choice, int) else choice.to(torch.int8)
        previous = choice
    return x, states


def unskip(choice: StateChoice) -> StateChoice:
    """`choice` with full precision where it skips (an outer layer runs quantized where asked, never skipped)."""
    if isinstance(choice, int):
        return int(State.FULL) if spec(choice).skips else choice
    skips = torch.tensor([spec(int(c)).skips for c in choice.unique()], dtype=torch.bool)
    if not bool(skips.any()):
        return choice
    codes = choice.unique()[skips]
    return torch.where(torch.isin(choice, codes), torch.full_like(choice, int(State.FULL)), choice)


def per_row(deciders: Sequence[Decider]) -> Decider:
    """The decider of a step whose rows each bring their own (requests at their own operating points): one row's
    as it is; rows all in full, one plain `Decider`; rows of one kind that can `fuse`, fused (one scoring call per
    layer); else `PerRow`."""
    if len(deciders) == 1:
        return deciders[0]
    kinds = {type(d) for d in deciders} - {Decider}
    if not kinds:
        return deciders[0]
    if len(kinds) == 1:
        fused = kinds.pop().fuse(deciders)
        if fused is not None:
            return fused
    return PerRow(deciders)


class Wrapper(Decider):
    """A decider that changes the answers of another; traits, `begin` and `end` pass through to it."""

    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    @property
    def traits(self) -> Traits:  # type: ignore[override]
        return self.decider.traits

    def begin(self, step: StepInfo) -> None:
        self.decider.begin(step)

    def end(self, states: torch.Tensor) -> None:
        self.decider.end(states)

    def again(self, states: torch.Tensor, valid: torch.Tensor | None) -> bool:
        return self.decider.again(states, valid)


class TimedDecider(Wrapper):
    """Wraps a decider and adds up the wall time spent deciding in decode steps (the policy overhead)."""

    def __init__(self, decider: Decider) -> None:
        super().__init__(decider)
        self.seconds, self.steps, self.prefill = 0.0, 0, True

    def reset(self) -> None:
        self.seconds, self.steps = 0.0, 0

    def begin(self, step: StepInfo) -> None:
        self.prefill = step.prefill
        self.steps += not step.prefill
        self.decider.begin(step)

    def planned(self, num_layers: int) -> list[int] | None:
        """The wrapped decider's plan (nothing to time: no decision is asked for); None for a subclass that
        answers otherwise (`measure.profiling._Consulted` runs every layer in full while it times the answers)."""
        if type(self).__call__ is not TimedDecider.__call__:
            return None
        return self.decider.planned(num_layers)

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        t0 = time.perf_counter()
        answer = self.decider(layer, hidden, previous)
        if not self.prefill:
            self.seconds += time.perf_counter() - t0
        return answer

    @property
    def ms_per_step(self) -> float:
        return self.seconds * 1000 / max(self.steps, 1)


class FixedStates(Decider):
    """One state per layer for every token (static skipping, uniform quantization, ...); codes or names.

    The first and the last layer run in full whatever is given for them (METHOD.md), unless `quantized_outer`: then
    they run the state given, which may be quantized but never a skip (llama.cpp's Q8_0 quantizes every layer; an
    option a user asks for, with its perplexity cost measured in docs/speed.md)."""

    def __init__(self, states: Sequence[int | str], quantized_outer: bool = False) -> None:
        self.states = [parse(s) for s in states]
        if len(self.states) >= 2 and (spec(self.states[0]).skips or spec(self.states[-1]).skips):
            raise DashskipError("the first and the last layer always run in full (state 4); remove state 0 from them")
        if quantized_outer:
            self.traits = Traits(quantized_outer=True)

    def begin(self, step: StepInfo) -> None:
        if len(self.states) != step.num_layers:
            raise DashskipError(f"{len(self.states)} states given for a model with {step.num_layers} layers")

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        return self.states[layer]

    def planned(self, num_layers: int) -> list[int] | None:
        return list(self.states) if type(self).__call__ is FixedStates.__call__ else None


def inner_layers(num_layers: int, state: int | str) -> FixedStates:
    """`state` on every layer but the first and the last, which run in full."""
    return FixedStates([int(State.FULL)] + [parse(state)] * (num_layers - 2) + [int(State.FULL)])


def every_layer(num_layers: int, state: int | str) -> FixedStates:
    """`state` (not a skip) on every layer, the first and the last included."""
    return FixedStates([parse(state)] * num_layers, quantized_outer=True)


class TokenStates(Decider):
    """States from a function of (layer, positions) -> (batch, tokens) tensor; used to test mixed steps."""

    def __init__(self, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.positions: torch.Tensor | None = None

    def begin(self, step: StepInfo) -> None:
        self.positions = step.positions

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        return self.fn(layer, self.positions)


class AtMost(Wrapper):
    """Runs the wrapped method's choices at no more than `state`'s bits: where it chose a more precise state,
    `state` runs. For drafting, whose tokens the full model verifies anyway, INT8 in place of full precision
    halves a layer's cost and rarely changes the argmax."""

    def __init__(self, decider: Decider, state: int) -> None:
        super().__init__(decider)
        self.state = check_state(state)
        self.bits = spec(state).bits

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        answer = self.decider(layer, hidden, previous)
        if isinstance(answer, torch.Tensor):
            above = torch.zeros_like(answer, dtype=torch.bool)
            for s in registered():
                if s.bits > self.bits:
                    above |= answer == s.code
            return torch.where(above, self.state, answer)
        return self.state if spec(answer).bits > self.bits else answer


class FullFor(Wrapper):
    """`decider`, except that the given (batch, tokens) rows run every layer in full (rerunning non-finite rows,
    a serving engine's requests at 1.0x)."""

    def __init__(self, decider: Decider, rows: torch.Tensor) -> None:
        super().__init__(decider)
        self.rows = rows

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        answer = self.decider(layer, hidden, previous)
        return torch.where(self.rows, int(State.FULL), torch.as_tensor(answer).expand(self.rows.shape))


class BatchMajority(Wrapper):
    """Batch-majority voting (the RL-adapter paper): per layer and position, every row runs the state most rows
    chose, so a batch never splits into state groups; ties go to the more precise state. Only `voters` ((rows,),
    (rows, 1) or (rows, tokens), True where a row votes) are counted: rows held in full (requests at 1.0x, `FullFor`) do
    not vote, or a 1.0x request would hold its neighbours in full (a 2.0x request beside one ran at 1.37)."""

    def __init__(self, decider: Decider, voters: torch.Tensor | None = None) -> None:
        super().__init__(decider)
        self.voters = voters.reshape(-1, 1) if voters is not None and voters.ndim == 1 else voters

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        answer = self.decider(layer, hidden, previous)
        if not isinstance(answer, torch.Tensor):
            return answer
        order = [s.code for s in reversed(registered())]  # most precise first
        voting = torch.ones_like(answer, dtype=torch.bool) if self.voters is None else self.voters.expand_as(answer)
        votes = torch.stack([((answer == s) & voting).sum(0) for s in order])  # (states, tokens)
        winner = torch.tensor(order)[votes.argmax(0)]  # argmax takes the first maximum: the most precise
        return winner[None].expand_as(answer)


class PerRow(Decider):
    """One decider per row of the batch (each request its own method and operating point) in one step.

    Each row's decider sees only its row; their answers are stacked. Rows must agree on their traits (how states
    run), since a step runs one set of skip scales and sublayer plans.
    """

    def __init__(self, deciders: Sequence[Decider]) -> None:
        self.deciders = list(deciders)
        first = self.deciders[0].traits
        if any(not d.traits.same_as(first) for d in self.deciders[1:]):
            raise DashskipError("rows of one step must run their states the same way (same skip scales and plans)")
        self.traits = first

    def begin(self, step: StepInfo) -> None:
        if step.positions.shape[0] != len(self.deciders):
            raise DashskipError(f"{len(self.deciders)} deciders for a batch of {step.positions.shape[0]} rows")
        for r, d in enumerate(self.deciders):
            d.begin(step.rows(slice(r, r + 1)))

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        answers = []
        for r, d in enumerate(self.deciders):
            prev = previous[r : r + 1] if isinstance(previous, torch.Tensor) else previous
            answers.append(d(layer, hidden[r : r + 1], prev))
        if all(not isinstance(a, torch.Tensor) for a in answers) and len(set(answers)) == 1:
            return answers[0]
        tokens = hidden.shape[1]
        return torch.cat([torch.as_tensor(a).expand(1, tokens) for a in answers])

    def end(self, states: torch.Tensor) -> None:
        for r, d in enumerate(self.deciders):
            d.end(states[r : r + 1])


class Lookahead(Decider):
    """When a policy decides: asynchronous mode (the default, eq. 19-20) decides layer i+1 from the input of
    layer i as layer i starts, so the decision overlaps the layer; sync mode decides each layer from its own
    input. Subclasses say what to decide (`choose`); the first and last layer always run in full."""

    mode: str
    last: int
    scales: torch.Tensor
    pending: StateChoice | None = None
    scaled_input: bool = False  # whether `choose` wants the async input times scale_i (training), or as it is

    def choose(self, hidden: torch.Tensor, current: int, nxt: int, previous: StateChoice) -> StateChoice:
        raise NotImplementedError

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        if self.mode == "sync":
            if layer in (0, self.last):
                return int(State.FULL)
            return self.choose(hidden, layer - 1, layer, previous)
        current = self.pending if self.pending is not None else int(State.FULL)
        self.pending = None
        if layer + 1 < self.last:  # decide layer+1 now, from the scaled input of this layer
            scaled = hidden * self.scales[layer] if self.scaled_input else hidden  # the greedy scorer cancels it
            self.pending = self.choose(scaled, layer, layer + 1, current)
        return current
