"""The execution states a layer can run in, as a registry: one entry per state.

A state is a name, the number that stands for it in state tensors (`code`), the weight bits the method counts
for it (the policy's distance and efficiency terms read these), a relative cost before this machine has been
profiled, and the handler that packs a linear's weight for it and runs it (`core/handlers.py`, one handler per
scheme, as in gpt-fast's quantization). Skip has no handler: a skipped layer runs no linear at all.

Everything that loops over states iterates `registered()`; adding a state (bf16, INT2, ...) is one `register`
call with its handler. The built-in codes 0/1/2/4 are those of METHOD.md, where a state's value is its bits / 4
with full precision counted as 16 bits (the paper's convention, also for fp32 weights).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

from dashskip.errors import DashskipError

FULL_BITS = 16  # what the method counts for full precision (METHOD.md), whatever the weights' dtype


class State(IntEnum):
    """Codes of the built-in states."""

    SKIP = 0
    INT4 = 1
    INT8 = 2
    FULL = 4


@dataclass(frozen=True)
class StateSpec:
    code: int  # the number in state tensors, schedules and cost tables
    name: str  # the name in policy files, statistics and the command line
    bits: int  # weight bits the method counts: 0 for skip, FULL_BITS for full precision
    default_cost: float  # relative cost (full = 1) before `dashskip profile` has measured this machine
    handler: Any = None  # packs and runs a linear in this state (core.handlers); None for skip

    @property
    def level(self) -> float:
        """The state's value s in METHOD.md's formulas (|s - s_i|, 4 - s): bits / 4."""
        return self.bits / 4

    @property
    def skips(self) -> bool:
        return self.handler is None


_REGISTRY: dict[int, StateSpec] = {}


def register(spec: StateSpec) -> StateSpec:
    """Add a state; its code and name must be new (re-registering the same spec is harmless)."""
    known = _REGISTRY.get(spec.code)
    if known is not None and known != spec:
        raise DashskipError(f"state code {spec.code} is taken by '{known.name}'; register '{spec.name}' under another")
    if any(s.name == spec.name and s.code != spec.code for s in _REGISTRY.values()):
        raise DashskipError(f"a state named '{spec.name}' is registered already")
    if spec.bits < 0 or spec.bits > FULL_BITS or (spec.handler is None) != (spec.bits == 0):
        raise DashskipError(f"state '{spec.name}': bits must be 0 for skip (no handler) or in 1..{FULL_BITS}")
    _REGISTRY[spec.code] = spec
    return spec


def unregister(code: int) -> None:
    """Remove a state added by `register` (tests add toy states); the built-in ones stay."""
    if code in tuple(State):
        raise DashskipError(f"state {code} is built in and cannot be removed")
    _REGISTRY.pop(code, None)


def registered() -> list[StateSpec]:
    """Every state, cheapest bits first (skip ... full)."""
    return sorted(_REGISTRY.values(), key=lambda s: (s.bits, s.code))


def codes() -> list[int]:
    return [s.code for s in registered()]


def spec(code: int) -> StateSpec:
    found = _REGISTRY.get(int(code))
    if found is None:
        names = ", ".join(f"{s.code} ({s.name})" for s in registered())
        raise DashskipError(f"invalid execution state {code!r}; states are {names}")
    return found


def by_name(name: str) -> StateSpec:
    for s in _REGISTRY.values():
        if s.name == name:
            return s
    raise DashskipError(f"unknown state '{name}'; states are {', '.join(s.name for s in registered())}")


def parse(value: int | str) -> int:
    """A state given by code or by name -> its code."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        return by_name(value.strip()).code
    return check_state(int(value))


def check_state(value: int) -> int:
    return spec(value).code


def check_state_tensor(states: torch.Tensor) -> None:
    bad = ~torch.isin(states, torch.tensor(codes(), device=states.device))
    if bool(bad.any()):
        check_state(int(states[bad][0]))


def code_lookup(values: dict[int, float], fill: float = 0.0) -> torch.Tensor:
    """A tensor t with t[code] = values[code], to map state tensors to numbers with one indexing."""
    table = torch.full((max(max(values, default=0), max(codes())) + 1,), fill)
    for code, value in values.items():
        table[code] = value
    return table


def names(states: Iterable[int]) -> list[str]:
    return [spec(s).name for s in states]


def _builtins() -> None:
    from dashskip.core import handlers

    register(StateSpec(State.SKIP, "skip", 0, 0.0))
    register(StateSpec(State.INT4, "int4", 4, 0.4, handlers.Int4WeightOnly()))
    register(StateSpec(State.INT8, "int8", 8, 0.5, handlers.Int8WeightOnly()))
    register(StateSpec(State.FULL, "full", FULL_BITS, 1.0, handlers.FullPrecision()))


_builtins()
