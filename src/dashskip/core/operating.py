"""The operating point: what a user asked for, and what it resolved to on this host.

A bare float meant two things: a decode wall-clock speedup (against the full path with the same LM head, on this
machine) in one place and a compute ratio (the paper's L / sum of executed layer costs) in another, and each
place validated and converted it its own way, so a value one place accepted another refused (a server request
at 1.9 passed the server's check as a ratio, then killed the scheduler as a speedup). An `OperatingPoint` is
built once, where a request enters (CLI, Python API, server, vLLM, lm-eval), by `resolve`: it is refused there
with one message, or it carries everything the layers below need (the compute ratio to run at) and everything
the answer reports (what was asked, in which unit, what this host reaches). Nothing below re-validates it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dashskip.core.costs import CostTable
from dashskip.errors import DashskipError


class Unit(StrEnum):
    """What a number asked for means."""

    SPEEDUP = "speedup"  # decode wall clock against the engine's full path with the same LM head, on this host
    RATIO = "ratio"  # compute ratio: layers / executed layer cost per token (the paper's axis)


FULL_RATIO = 1.0


@dataclass(frozen=True)
class OperatingPoint:
    """A resolved operating point. `ratio` is what the layers run at; `speedup` the decode speedup this host's
    cost table predicts there (equal to `ratio` where the table does not know what a token costs beyond its
    layers); `reach` the most that could be asked in `unit` on this host (1.0 without a policy)."""

    asked: float
    unit: Unit
    ratio: float
    speedup: float
    reach: float
    head: str = "full"

    @property
    def full(self) -> bool:
        """Every layer in full precision: no policy runs."""
        return self.ratio <= FULL_RATIO

    def as_dict(self) -> dict[str, Any]:
        return {
            "asked": self.asked,
            "unit": str(self.unit),
            "compute_ratio": round(self.ratio, 4),
            "predicted_speedup": round(self.speedup, 4),
            "reach": round(self.reach, 4),
            "head": self.head,
        }


def full(unit: Unit = Unit.SPEEDUP, head: str = "full") -> OperatingPoint:
    """Every layer in full: 1.0 in either unit."""
    return OperatingPoint(FULL_RATIO, unit, FULL_RATIO, FULL_RATIO, FULL_RATIO, head)


def check_number(value: Any, name: str = "speedup") -> float:
    """A finite number >= 1.0 (not a bool, not a string), or a one-line error naming the field."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DashskipError(f"{name} must be a number >= 1.0 (1.0 = every layer in full), got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 1.0:
        raise DashskipError(f"{name} must be >= 1.0 (1.0 = every layer in full), got {value!r}")
    return number


def resolve(
    asked: Any,
    unit: Unit,
    reach_ratio: float | None,
    costs: CostTable,
    layers: int,
    head: str = "full",
    decisions: str | None = None,
    name: str = "speedup",
) -> OperatingPoint:
    """The one place an operating point is checked and converted.

    `reach_ratio`: the highest compute ratio the decision method can run at (None: no method, only 1.0 works).
    With `unit` SPEEDUP the compute ratio is the one at which this host's `costs` predict that decode speedup
    (`CostTable.compute_target`); a table that does not know the cost beyond the layers treats it as a ratio.
    """
    number = check_number(asked, name)
    if reach_ratio is None:
        if number == FULL_RATIO:
            return full(unit, head)
        raise DashskipError(
            f"{name} {number:g} needs a trained policy and none is loaded; pass a policy "
            "(train one with `dashskip train`), or ask for 1.0"
        )
    reach = costs.speedup_at(reach_ratio, layers, head, decisions) if unit is Unit.SPEEDUP else reach_ratio
    if number == FULL_RATIO:
        return OperatingPoint(FULL_RATIO, unit, FULL_RATIO, FULL_RATIO, reach, head)
    wall_clock = unit is Unit.SPEEDUP and costs.wall_clock(head, decisions)
    ratio = costs.compute_target(number, layers, head, decisions) if unit is Unit.SPEEDUP else number
    if ratio > reach_ratio + 1e-9:
        if wall_clock:
            most = math.floor(reach * 100) / 100  # rounded down: asking the figure named is always accepted
            raise DashskipError(
                f"{name} {number:g} is beyond this policy on this machine: it needs a compute ratio of {ratio:.2f} "
                f"(the {head} LM head and the policy's decisions take their share of a step) and the policy was "
                f"calibrated up to {reach_ratio:.2f}, about {reach:.2f}x; ask for at most {most:.2f}"
            )
        raise DashskipError(
            f"{name} {number:g} is above the range this policy was calibrated for (up to {reach_ratio:.2f}); "
            "ask for less, or re-run `dashskip train` with a higher --speedup"
        )
    return OperatingPoint(number, unit, ratio, costs.speedup_at(ratio, layers, head, decisions), reach, head)
