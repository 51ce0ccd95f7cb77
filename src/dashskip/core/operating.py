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

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tqdm.auto import tqdm

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


CURVE_TOLERANCE = 0.03  # a calibrated point that lands further than this from its target is not offered as it


@dataclass
class OperatingCurve:
    """A decision method's knob (DASH's cost bias, the RL adapter's threshold) against the compute ratio it gave on
    held-out text: every knob tried, and the one found for each target. The one home of a method's operating
    curve: calibration by bisection, the knob for a ratio (exact where calibrated, else interpolated), the reach,
    the slope a rate controller steers by, and the form it takes in a policy file's metadata."""

    tried: dict[float, float]  # knob -> compute ratio measured on the held-out text
    points: dict[str, float]  # f"{target:.2f}" -> the knob calibrated for that target
    # knob -> the share of the text's token-layers run in each state (code -> fraction): what the same knob's
    # ratio is on another host's cost table (`on`); empty for curves calibrated before it was kept
    states: dict[float, dict[int, float]] = field(default_factory=dict)

    @classmethod
    def calibrate(
        cls,
        ratio_at: Callable[[float], float],
        targets: Sequence[float],
        rising: bool,
        start: tuple[float, float],
        steps: int,
        cover: tuple[float, float] | None = None,
        limit: float = 1e6,
        progress: bool = True,
        desc: str = "operating points",
    ) -> OperatingCurve:
        """The knob of each target by bisection on `ratio_at` (a real run on held-out text, called once per knob).
        `rising`: the ratio rises with the knob. `start` (< 0, > 0) is widened x4 (up to +-`limit`) until it brackets
        a target, and first until the knobs tried reach both ends of `cover` (low, high ratio), so the curve spans
        them."""
        tried: dict[float, float] = {}

        def ratio(knob: float) -> float:
            if knob not in tried:
                tried[knob] = ratio_at(knob)
            return tried[knob]

        def past(knob: float, target: float) -> bool:  # the knob is at or beyond the target's (in knob order)
            return (ratio(knob) > target) == rising

        def before(knob: float, target: float) -> bool:  # strictly before the target's knob (in knob order)
            return ratio(knob) < target if rising else ratio(knob) > target

        def after(knob: float, target: float) -> bool:  # strictly after it
            return ratio(knob) > target if rising else ratio(knob) < target

        def widen(lo: float, hi: float, low_side: float, high_side: float) -> tuple[float, float]:
            while after(lo, low_side) and lo > -limit:
                lo *= 4
            while before(hi, high_side) and hi < limit:
                hi *= 4
            return lo, hi

        def sides(low: float, high: float) -> tuple[float, float]:  # ratios wanted at the (lo, hi) knob ends
            return (low, high) if rising else (high, low)

        if cover is not None:
            start = widen(*start, *sides(*cover))
        points = {}
        for target in tqdm(targets, desc=desc, disable=not progress):
            lo, hi = widen(*start, target, target)
            mid = hi
            for _ in range(steps):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if past(mid, target) else (mid, hi)
                if abs(ratio(mid) / target - 1) < 0.005:
                    break
            points[f"{target:.2f}"] = min((lo, hi, mid), key=lambda k: abs(ratio(k) - target))
        return cls(tried, points)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], points_key: str) -> OperatingCurve:
        states = {float(k): {int(c): float(f) for c, f in fractions.items()}
                  for k, fractions in meta.get("curve_states") or []}  # fmt: skip
        return cls({float(k): float(r) for k, r in meta.get("ratio_curve") or []},
                   {t: float(k) for t, k in (meta.get(points_key) or {}).items()}, states)  # fmt: skip

    def write(self, meta: dict[str, Any], points_key: str) -> None:
        """Into a policy file's metadata: the points, the ratio each reached, the curve sorted by knob, and
        the states each knob ran (where known)."""
        meta[points_key] = dict(self.points)
        meta["operating_point_ratios"] = {t: round(self.tried[k], 4) for t, k in self.points.items()}
        meta["ratio_curve"] = sorted([[k, r] for k, r in self.tried.items()])
        if self.states:
            meta["curve_states"] = sorted([[k, {str(c): round(f, 6) for c, f in s.items()}]
                                           for k, s in self.states.items()])  # fmt: skip
        else:  # states of another curve must not stay beside this one
            meta.pop("curve_states", None)

    def on(self, costs: CostTable) -> OperatingCurve:
        """The same knobs' compute ratios on another cost table (this host's): the states each knob ran are the
        text's, their cost is the table's. A policy's reach measured on the table it was calibrated with (an AMD
        host's: INT8 0.39 of a full layer) overstates it where INT8 costs 0.6. Without the states: as it is.
        Calibrated points are dropped (they were exact on the other table); knobs are interpolated."""
        if not self.states or set(self.states) != set(self.tried):
            return self
        tried = {k: 1.0 / sum(f * costs.cost(c) for c, f in s.items()) for k, s in self.states.items()}
        return OperatingCurve(tried, {}, self.states)

    def keep(self, knobs: Sequence[float]) -> OperatingCurve:
        """Only these knobs, and the points calibrated at them."""
        tried = {k: self.tried[k] for k in knobs}
        states = {k: s for k, s in self.states.items() if k in tried}
        return OperatingCurve(tried, {t: k for t, k in self.points.items() if k in tried}, states)

    @property
    def reach(self) -> float:
        """The highest compute ratio measured (1.0 for an empty curve)."""
        return max(self.tried.values(), default=FULL_RATIO)

    def knob_for(self, ratio: float, owner: str, remedy: str) -> float:
        """The knob that delivers compute ratio `ratio`: a calibrated point's (where it landed within
        `CURVE_TOLERANCE`), else interpolated on the measured curve; outside it, one line naming the range."""
        ratio = check_number(ratio)
        key = f"{ratio:.2f}"
        if key in self.points:
            reached = self.tried.get(self.points[key], ratio)
            if abs(reached / ratio - 1) > CURVE_TOLERANCE:  # the ratio jumps there: no knob gives it
                raise DashskipError(f"{owner} reached {ratio:g} only as {reached:.2f} on the held-out text (more "
                                    f"than {CURVE_TOLERANCE:.0%} off); ask for {reached:.2f} instead")  # fmt: skip
            return self.points[key]
        by_ratio = sorted(self.tried.items(), key=lambda p: p[1])
        if not by_ratio or ratio > self.reach + 1e-9:
            raise DashskipError(f"speedup {ratio:g} is above the range {owner} was calibrated for (up to "
                                f"{self.reach:.2f}); {remedy}")  # fmt: skip
        low = by_ratio[0][1]
        if ratio < low and ratio / low - 1 < -CURVE_TOLERANCE:
            raise DashskipError(f"speedup {ratio:g} is below the range {owner} was calibrated for (from "
                                f"{low:.2f}); {remedy}")  # fmt: skip
        if ratio <= low:
            return by_ratio[0][0]
        for (k0, r0), (k1, r1) in itertools.pairwise(by_ratio):
            if r0 <= ratio <= r1:
                return k0 if r1 == r0 else k0 + (ratio - r0) / (r1 - r0) * (k1 - k0)
        return by_ratio[-1][0]

    def slope(self, knob: float) -> float:
        """|d(ratio)/d(knob)| of the curve around `knob` (at least a small floor); 1.0 with fewer than 2 points."""
        points = sorted(self.tried.items())
        if len(points) < 2:
            return 1.0
        knob = min(max(knob, points[0][0]), points[-1][0])
        (k0, r0), (k1, r1) = next(p for p in itertools.pairwise(points) if knob <= p[1][0])
        return max(abs(r1 - r0) / max(k1 - k0, 1e-6), 1e-3)

    def span(self, fallback: float) -> tuple[float, float]:
        """The knobs tried, widened by their spread on each side: how far a controller may move one."""
        knobs = list(self.tried) or [fallback]
        width = max(knobs) - min(knobs) or 1.0
        return min(knobs) - width, max(knobs) + width
