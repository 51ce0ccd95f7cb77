"""The operating curve alone: a method's knob against the compute ratio it gives, on functions whose answer is known."""

import math

import pytest

from dashskip.core.operating import OperatingCurve
from dashskip.errors import DashskipError


def rising(bias: float) -> float:
    """A DASH-like curve: 1.0 far below, 3.0 far above, smooth between."""
    return 1.0 + 2.0 / (1.0 + math.exp(-bias / 3.0))


def falling(threshold: float) -> float:
    """An RL-adapter-like curve: the ratio falls as the threshold rises."""
    return rising(-threshold)


@pytest.mark.parametrize("fn, is_rising", [(rising, True), (falling, False)], ids=["rising", "falling"])
def test_calibrated_points_hit_their_targets_in_either_direction(fn, is_rising):
    calls = []

    def ratio(knob: float) -> float:
        calls.append(knob)
        return fn(knob)

    curve = OperatingCurve.calibrate(ratio, (1.3, 2.0, 2.8), is_rising, (-1.0, 1.0), steps=20, progress=False)
    for target in (1.3, 2.0, 2.8):
        assert abs(fn(curve.points[f"{target:.2f}"]) / target - 1) < 0.005
        assert abs(fn(curve.knob_for(target, "this curve", "")) / target - 1) < 0.005
    assert len(calls) == len(set(calls)) == len(curve.tried)  # each knob run once
    between = curve.knob_for(1.65, "this curve", "")  # not calibrated: interpolated between measured points
    assert abs(fn(between) / 1.65 - 1) < 0.05
    assert curve.reach == max(curve.tried.values()) < 3.0


def test_cover_spans_the_curve_from_full_to_past_the_highest_target():
    curve = OperatingCurve.calibrate(rising, (1.5,), True, (-1.0, 1.0), steps=10, cover=(1.001, 1.5 * 1.05),
                                     progress=False)  # fmt: skip
    assert min(curve.tried.values()) <= 1.001 and curve.reach >= 1.5 * 1.05
    assert abs(rising(curve.knob_for(1.0005, "this curve", "")) - 1.0005) < 0.01  # near 1.0: within the curve


def test_out_of_range_and_missed_points_are_refused_with_the_range():
    curve = OperatingCurve({-2.0: 1.2, 0.0: 1.5, 3.0: 2.4}, {"2.00": 3.0, "1.50": 0.0})
    with pytest.raises(DashskipError, match=r"above the range this curve was calibrated for \(up to 2\.40\); fix"):
        curve.knob_for(2.5, "this curve", "fix")
    with pytest.raises(DashskipError, match=r"below the range this curve was calibrated for \(from 1\.20\)"):
        curve.knob_for(1.1, "this curve", "fix")
    with pytest.raises(DashskipError, match=r"reached 2 only as 2\.40.*ask for 2\.40 instead"):
        curve.knob_for(2.0, "this curve", "fix")  # its point landed 20% off: not offered as if it held
    assert curve.knob_for(1.5, "this curve", "fix") == 0.0
    assert curve.slope(1.0) == pytest.approx(0.9 / 3.0) and curve.span(0.0) == (-7.0, 8.0)
    kept = curve.keep([-2.0, 0.0])
    assert kept.reach == 1.5 and kept.points == {"1.50": 0.0}


def test_a_curve_survives_a_policy_files_metadata():
    curve = OperatingCurve.calibrate(rising, (1.3, 2.0), True, (-1.0, 1.0), steps=12, progress=False)
    meta: dict = {}
    curve.write(meta, "operating_points")
    again = OperatingCurve.from_meta(meta, "operating_points")
    assert again.points == curve.points and again.tried == pytest.approx(curve.tried, abs=1e-4)
    assert set(meta["operating_point_ratios"]) == {"1.30", "2.00"}


def test_a_curve_on_another_hosts_table_costs_the_states_each_knob_ran():
    """The same knob runs the same states on the same text; on a table where INT8 costs more, its ratio (and the
    reach) is lower, and calibrated points, exact on the first table only, give way to interpolation."""
    from dashskip.core.costs import CostTable

    own = {0: 0.1, 1: 0.3, 2: 0.4, 4: 1.0}
    states = {-5.0: {4: 1.0}, 0.0: {4: 0.5, 2: 0.5}, 5.0: {4: 0.1, 2: 0.6, 0: 0.3}}
    tried = {k: 1 / sum(f * own[c] for c, f in s.items()) for k, s in states.items()}
    curve = OperatingCurve(tried, {"1.43": 0.0}, states)
    assert curve.on(CostTable(own, own)).tried == pytest.approx(tried)
    slow = {0: 0.15, 1: 0.45, 2: 0.6, 4: 1.0}
    there = curve.on(CostTable(slow, slow))
    assert there.tried[5.0] == pytest.approx(1 / (0.1 + 0.36 + 0.045)) and there.reach < curve.reach
    assert there.points == {} and there.knob_for(there.tried[0.0], "it", "") == pytest.approx(0.0)
    assert OperatingCurve(tried, {}).on(CostTable(slow, slow)).tried == tried  # no states kept: as it is
    meta: dict = {}
    curve.write(meta, "operating_points")
    assert OperatingCurve.from_meta(meta, "operating_points").states == states


def test_a_policys_reach_is_its_reach_on_the_table_it_runs_on():
    """A point the policy runs on its own table is refused on a slower host's, with that host's reach named."""
    from dashskip.core.costs import CostTable
    from tests.conftest import make_policy

    policy = make_policy()
    policy.meta["curve_states"] = [[-1.0, {"4": 1.0}], [0.0, {"4": 0.7, "2": 0.3}], [1.0, {"4": 0.4, "2": 0.6}],
                                   [4.0, {"4": 0.3, "2": 0.4, "0": 0.3}]]  # fmt: skip
    slow = CostTable({0: 0.2, 1: 0.6, 2: 0.8, 4: 1.0}, {0: 0.2, 1: 0.6, 2: 0.8, 4: 1.0})
    assert policy.max_speedup() == 3.0 and policy.max_speedup(slow) == pytest.approx(1 / (0.3 + 0.32 + 0.06))
    assert policy.operating_point(2.0).ratio == 2.0
    with pytest.raises(DashskipError, match=r"above the range this policy was calibrated for \(up to 1\.47\)"):
        policy.decider(2.0, costs=slow)
