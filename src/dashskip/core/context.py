"""What travels with one engine step: the states of a layer's rows, and the step's positions, masks and cache.

Nothing here is shared between steps or requests: the engine builds a `StepContext` per step and a `Rows` per
layer and passes them to the layer explicitly (as vLLM passes attention metadata with each forward), so two
sequences at different operating points can share a step, and a serving engine can hand in per-token states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dashskip.core.cache import KVCache, KVRule
from dashskip.core.states import spec

StateChoice = int | torch.Tensor  # one state for every row, or a (batch, tokens) tensor of states


@dataclass(frozen=True)
class Rows:
    """The states of the rows a layer runs: one for all (`uniform`, the fast path), or per row (`groups`)."""

    uniform: int | None
    groups: tuple[tuple[int, torch.Tensor], ...] = ()  # (state, flat row indices), one entry per state present
    states: torch.Tensor | None = None  # (batch, tokens) when mixed

    @classmethod
    def of(cls, choice: StateChoice) -> Rows:
        if not isinstance(choice, torch.Tensor):
            return cls(int(choice))
        flat = choice.reshape(-1)
        present = torch.unique(flat).tolist()
        if len(present) == 1:
            return cls(int(present[0]))
        groups = tuple((int(s), torch.nonzero(flat == s).squeeze(1)) for s in present)
        return cls(None, groups, choice)

    def skipped(self) -> torch.Tensor | None:
        """(batch, tokens) bool of rows in a skip state, for mixed rows; None when uniform."""
        if self.states is None:
            return None
        mask = torch.zeros_like(self.states, dtype=torch.bool)
        for state, _ in self.groups:
            if spec(state).skips:
                mask |= self.states == state
        return mask

    def any_skipped(self) -> bool:
        return any(spec(s).skips for s, _ in self.groups)

    def with_skips_as(self, state: int) -> Rows:
        """The same rows with every skipped one in `state` (a skipped token's K/V projections run in full)."""
        if self.states is None:
            return self
        return Rows.of(torch.where(self.skipped(), state, self.states))


@dataclass
class StepContext:
    """One step's positions, rotary tables (per layer type), masks (per sliding window) and cache."""

    positions: torch.Tensor  # (batch, tokens)
    ropes: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[int | None, torch.Tensor | None]
    cache: KVCache
    kv_rule: KVRule
    # Left padding as the compiled attention takes it: row b's first real key slot, (batch,) int64; an empty
    # tensor when no row has padding; None when some row's real keys are not one run up to the step's end.
    key_begins: torch.Tensor | None = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def plain_causal(self) -> bool:
        """Every query sees the keys from its row's first real one up to itself, or the last of them in a sliding
        window (no padding inside a row): the compiled causal attention applies."""
        return self.key_begins is not None
