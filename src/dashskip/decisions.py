"""The pluggable decision function: which state each token runs each layer in.

The engine asks a `Decider` once per layer with the hidden state entering
that layer; for the first and last layer the answer is ignored (they always
run in full; an exit-style method may skip the last), but the call lets an
asynchronous policy look ahead.
It may answer one state for the whole step (an `int`: the fast path, no
per-row grouping) or a (batch, tokens) tensor of states. DASH's learned
policy, the baselines and the fixed schedules below all implement this.

Three class attributes let a method change how the engine runs the states,
each off by default: its own skip scales, a static plan of skipped attention /
MLP sublayers (AdaSkip), and permission to skip the last layer (early exit).
A decider that wraps another copies them with `inherit_traits`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dashskip.errors import DashskipError
from dashskip.states import State, check_state

StateChoice = int | torch.Tensor
VOTE_ORDER = (int(State.FULL), int(State.INT8), int(State.INT4), int(State.SKIP))  # most precise first


@dataclass(frozen=True)
class SublayerSkip:
    """A layer whose attention and/or MLP every token of every step skips (None: that sublayer runs).

    A skipped sublayer's residual-stream output is its input times the scale: `mid = attn * x`, `out = mlp * mid`.
    """

    attn: float | None = None
    mlp: float | None = None


@dataclass
class StepInfo:
    """What a decider may know about the step being run."""

    positions: torch.Tensor  # (batch, tokens) position ids
    prefill: bool
    num_layers: int


class Decider:
    """Base class: every layer in full."""

    # Skip scales this method was calibrated with; None: the engine's own.
    skip_scales: torch.Tensor | None = None
    # Layers whose sublayers are skipped statically, by index; the engine runs their kept sublayers in full.
    sublayers: dict[int, SublayerSkip] | None = None
    # Only exit-style methods may skip the last layer: for every other one it runs in full, as METHOD.md says.
    may_skip_last: bool = False
    # The compute ratio of a static sublayer plan, which the per-layer states (all full) cannot show.
    plan_ratio: float | None = None

    def begin(self, step: StepInfo) -> None:
        """Called before the first layer of every step."""

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        return int(State.FULL)


class FixedStates(Decider):
    """One state per layer for every token (static skipping, uniform quantization, ...)."""

    def __init__(self, states: Sequence[int]) -> None:
        self.states = [check_state(s) for s in states]
        if len(self.states) >= 2 and State.SKIP in (self.states[0], self.states[-1]):
            raise DashskipError("the first and the last layer always run in full (state 4); remove state 0 from them")

    def begin(self, step: StepInfo) -> None:
        if len(self.states) != step.num_layers:
            raise DashskipError(f"{len(self.states)} states given for a model with {step.num_layers} layers")

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        return self.states[layer]


def inherit_traits(wrapper: Decider, inner: Decider) -> None:
    """A wrapper changes which states run, not how: it must keep the wrapped method's scales, plan and exit rule."""
    wrapper.skip_scales, wrapper.sublayers = inner.skip_scales, inner.sublayers
    wrapper.may_skip_last, wrapper.plan_ratio = inner.may_skip_last, inner.plan_ratio


class TokenStates(Decider):
    """States from a function of (layer, positions) -> (batch, tokens) tensor; used to test mixed steps."""

    def __init__(self, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.positions: torch.Tensor | None = None

    def begin(self, step: StepInfo) -> None:
        self.positions = step.positions

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        return self.fn(layer, self.positions)


class AtMost(Decider):
    """Runs the wrapped method's choices at no more than `state`: where it chose a more precise state, `state`
    runs. For drafting, whose tokens the full model verifies anyway, INT8 in place of full precision halves a
    layer's cost and rarely changes the argmax."""

    def __init__(self, decider: Decider, state: int) -> None:
        self.decider, self.state = decider, check_state(state)
        inherit_traits(self, decider)

    def begin(self, step: StepInfo) -> None:
        self.decider.begin(step)

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        answer = self.decider(layer, hidden, previous)
        if isinstance(answer, torch.Tensor):
            return answer.clamp(max=self.state)
        return min(answer, self.state)


class BatchMajority(Decider):
    """Batch-majority voting (the RL-adapter paper): per layer and position, every row runs the state most rows
    chose, so a batch never splits into state groups; ties go to the more precise state."""

    def __init__(self, decider: Decider) -> None:
        self.decider = decider
        inherit_traits(self, decider)

    def begin(self, step: StepInfo) -> None:
        self.decider.begin(step)

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        answer = self.decider(layer, hidden, previous)
        if not isinstance(answer, torch.Tensor):
            return answer
        votes = torch.stack([(answer == s).sum(0) for s in VOTE_ORDER])  # (states, tokens)
        winner = torch.tensor(VOTE_ORDER)[votes.argmax(0)]  # argmax takes the first maximum: the most precise
        return winner[None].expand_as(answer)
