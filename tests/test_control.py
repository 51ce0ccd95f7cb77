"""The rate controller alone (methods/dash/control.py), on windows and sequences whose ratio is a known function
of the bias: what it converges to, where it stops, how it clamps, what it counts."""

from __future__ import annotations

import pytest
import torch

from dashskip.core.costs import CostTable
from dashskip.methods.dash.control import WINDOW_PASSES, WINDOW_TOLERANCE, RateControl

LAYERS, TOKENS = 6, 8
TABLE = {0: 0.0, 1: 0.4, 2: 0.5, 4: 1.0}
COSTS = CostTable(TABLE, TABLE)


def window_states(skipped: torch.Tensor) -> torch.Tensor:
    """(rows, TOKENS, LAYERS) all full but the first `skipped[row]` inner token-layers, which skip."""
    inner = torch.arange(TOKENS * (LAYERS - 2)).view(TOKENS, LAYERS - 2)
    states = torch.full((skipped.numel(), TOKENS, LAYERS), 4, dtype=torch.int8)
    states[:, :, 1:-1] = torch.where(inner[None] < skipped[:, None, None], 0, 4).to(torch.int8)
    return states


def score(control: RateControl, skipped_at, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """Engine.score's loop: pass after pass at the controller's bias; the states of the pass kept, the biases."""
    biases = []
    while True:
        control.reset(1)
        control.applied = control.bias().reshape(-1)
        biases.append(control.applied.clone())
        states = window_states(skipped_at(control.applied))
        if not control.retarget(states, valid):
            return states, biases


def ratio(states: torch.Tensor) -> float:
    return COSTS.compute_ratio(states)


def test_a_smooth_window_is_met_within_the_tolerance_in_few_passes():
    control = RateControl(1.5, 0.0, COSTS, LAYERS, slope=0.05)
    states, biases = score(control, lambda b: (b * 1.3).floor().clamp(0, 32).long())  # 48 / (48 - k)
    assert abs(ratio(states) / 1.5 - 1) <= WINDOW_TOLERANCE and len(biases) <= 4


def test_a_window_that_moves_in_steps_ends_at_the_best_bias_tried():
    """Skipping moves in blocks of 8 token-layers: 1.2x, 1.5x... but 1.45x is met by none. The secant
    overshoots; the passes stay inside their bracket, and the pass kept is the closest one tried."""
    control = RateControl(1.45, 0.0, COSTS, LAYERS, slope=0.01)
    states, biases = score(control, lambda b: ((b / 8).floor() * 8).clamp(0, 32).long())
    assert len(biases) == WINDOW_PASSES
    tried = [ratio(window_states(((b / 8).floor() * 8).clamp(0, 32).long())) for b in biases]
    assert ratio(states) == min(tried, key=lambda r: abs(r / 1.45 - 1)) == pytest.approx(1.5)
    bracketed = [b for b in biases[2:-1] if -50 < float(b) < 50]
    assert len(bracketed) == len(biases) - 3  # after overshooting once each way, never out to the clamp again


def test_a_bias_that_moves_nothing_takes_longer_steps():
    """The ratio did not move between two passes: the next step is four times longer, not the same again."""
    control = RateControl(1.5, 0.0, COSTS, LAYERS, slope=1.0)
    _, biases = score(control, lambda b: torch.where(b > 3, 16, 0).long())  # nothing moves below bias 3
    steps = [float(b1 - b0) for b0, b1 in zip(biases, biases[1:], strict=False)]
    assert steps[1] == pytest.approx(4 * steps[0], rel=1e-3)


def test_padding_is_left_out_of_a_windows_ratio():
    control = RateControl(1.5, 0.0, COSTS, LAYERS, slope=0.05)
    valid = torch.zeros(1, TOKENS, dtype=torch.bool)
    valid[0, :4] = True  # the last 4 positions are padding, the skipped layers all fall on the first 4
    states, _ = score(control, lambda b: (b * 1.3).floor().clamp(0, 16).long(), valid)
    counted = COSTS.token_costs(states)[valid]
    assert abs(LAYERS * counted.numel() / float(counted.sum()) / 1.5 - 1) <= WINDOW_TOLERANCE


def token_states(skipped: int) -> torch.Tensor:
    states = torch.full((1, 1, LAYERS), 4, dtype=torch.int8)
    states[0, 0, 1 : 1 + skipped] = 0
    return states


def test_generation_clamps_the_bias_and_pays_back_what_it_overspent():
    """A stretch where the input lets nothing skip pushes the bias to its clamp, never past it; once the input
    responds again, the sequence runs faster than asked until its whole count meets the target (the ratio
    reported is the sequence's, so the debt is paid, not forgotten)."""
    control = RateControl(2.0, 0.0, COSTS, LAYERS, slope=0.5, bias_range=(-3.0, 3.0))
    control.reset(1)
    states = []
    for token in range(200):
        bias = float(control.bias())
        assert -3.0 <= bias <= 3.0
        skipped = 0 if token < 20 else min(max(int(bias + 2), 0), LAYERS - 2)  # 1.5x at bias 0, 3.0x at 2
        if token == 19:
            assert bias == 3.0  # at the clamp
        states.append(token_states(skipped))
        control.observe(states[-1])
    assert abs(COSTS.compute_ratio(torch.cat(states, 1)) / 2.0 - 1) < 0.03
    assert abs(COSTS.compute_ratio(torch.cat(states[20:60], 1))) > 2.0  # paying back
