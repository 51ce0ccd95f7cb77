"""The pluggable decision function: which state each token runs each layer in.

The engine asks a `Decider` once per layer with the hidden state entering
that layer; for the first and last layer the answer is ignored (they always
run in full), but the call lets an asynchronous policy look ahead.
It may answer one state for the whole step (an `int`: the fast path, no
per-row grouping) or a (batch, tokens) tensor of states. DASH's learned
policy, the baselines and the fixed schedules below all implement this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dashskip.errors import DashskipError
from dashskip.states import State, check_state

StateChoice = int | torch.Tensor
VOTE_ORDER = (int(State.FULL), int(State.INT8), int(State.INT4), int(State.SKIP))  # most precise first


@dataclass
class StepInfo:
    """What a decider may know about the step being run."""

    positions: torch.Tensor  # (batch, tokens) position ids
    prefill: bool
    num_layers: int


class Decider:
    """Base class: every layer in full."""

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


class TokenStates(Decider):
    """States from a function of (layer, positions) -> (batch, tokens) tensor; used to test mixed steps."""

    def __init__(self, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.positions: torch.Tensor | None = None

    def begin(self, step: StepInfo) -> None:
        self.positions = step.positions

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        return self.fn(layer, self.positions)


class BatchMajority(Decider):
    """Batch-majority voting (the RL-adapter paper): per layer and position, every row runs the state most rows
    chose, so a batch never splits into state groups; ties go to the more precise state."""

    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    def begin(self, step: StepInfo) -> None:
        self.decider.begin(step)

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        answer = self.decider(layer, hidden, previous)
        if not isinstance(answer, torch.Tensor):
            return answer
        votes = torch.stack([(answer == s).sum(0) for s in VOTE_ORDER])  # (states, tokens)
        winner = torch.tensor(VOTE_ORDER)[votes.argmax(0)]  # argmax takes the first maximum: the most precise
        return winner[None].expand_as(answer)
