"""Baselines as decision functions of the same engine, each hitting a requested compute ratio."""

from __future__ import annotations

from dashskip.calibration import Calibration
from dashskip.decisions import FixedStates
from dashskip.errors import DashskipError
from dashskip.profiling import CostTable


def static_similarity(
    calibration: Calibration, costs: CostTable, speedup: float, tolerance: float = 0.03
) -> FixedStates:
    """ShortGPT-style static skipping: skip the inner layers with the highest input/output cosine.

    The number of skipped layers is the one whose compute ratio (measured cost table) is closest to `speedup`;
    it must land within `tolerance` of it.
    """
    n = calibration.num_layers
    inner = sorted(range(1, n - 1), key=lambda i: calibration.cosine[i], reverse=True)
    best, best_gap = None, float("inf")
    for k in range(len(inner) + 1):
        skipped = set(inner[:k])
        ratio = n / sum(costs.decode[0] if i in skipped else costs.decode[4] for i in range(n))
        if abs(ratio - speedup) < best_gap:
            best, best_gap = [0 if i in skipped else 4 for i in range(n)], abs(ratio - speedup)
    if best is None or best_gap > tolerance * speedup:
        raise DashskipError(f"static skipping cannot reach {speedup}x within {tolerance:.0%} on {n} layers")
    return FixedStates(best)
