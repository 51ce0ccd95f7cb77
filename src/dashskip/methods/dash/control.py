"""Operating points that hold: each sequence's cost bias is steered so that it runs at the compute ratio asked.

A policy's operating points are calibrated once, on WikiText-2: the cost bias that gave 1.67x there gives
1.26-1.58x on a chat prompt, a held-out paragraph or an ARC question. The controller watches what each row
actually spends and moves that row's bias (integral control on its cumulative excess cost), so the policy still
ranks tokens and layers as it learned and only its overall rate is corrected. The quantity steered is the one
reported: layers / mean executed cost per counted token, with the same cost table.

Generation counts the token each step produces (a step's last position; the prompt's other positions are not
reported). A controller is per sequence: it starts over at every prefill. Scoring a window (perplexity, a
multiple-choice question) is one step at the calibrated bias: there is no earlier token to correct from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dashskip.core.states import code_lookup

# Bias moved per token's worth of excess cost, as a fraction of the bias that the ratio curve says moves the ratio by
# 100%: 1.0 corrects an excess on the next token if the input responds as the calibration text did. Measured on
# SmolLM2 over chat, code, PTB, LAMBADA and XSum prompts (benchmarks/operating_points.py): 0.6 and 1.5 track as
# well (max error 1.3% / 1.2% at 48 tokens); lower gains undershoot on inputs far from the calibration text.
GAIN = 1.0


def curve_slope(curve: list[list[float]], bias: float) -> float:
    """d(ratio)/d(bias) of the policy's held-out ratio curve around `bias` (>= a small floor)."""
    points = sorted(curve)
    if len(points) < 2:
        return 1.0
    for (b0, r0), (b1, r1) in zip(points, points[1:], strict=False):
        if b0 <= bias <= b1 or (b1, r1) == tuple(points[-1]):
            return max((r1 - r0) / max(b1 - b0, 1e-6), 1e-3)
    return 1.0


@dataclass
class RateControl:
    """Per-row cost-bias control toward `target` (compute ratio) for a policy decided with `costs`."""

    target: float
    base_bias: float
    costs: dict[int, float]  # state code -> relative decode cost (the table the ratio is reported with)
    num_layers: int
    slope: float = 1.0  # d(ratio)/d(bias) near base_bias
    bias_range: tuple[float, float] = (-50.0, 50.0)
    gain: float = GAIN
    spent: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (batch,) cost of counted tokens
    counted: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (batch,) tokens counted

    def __post_init__(self) -> None:
        self.lookup = code_lookup(self.costs)
        self.per_token = self.num_layers / self.target  # the cost per token that reports `target`

    def reset(self, batch: int) -> None:
        self.spent = torch.zeros(batch, dtype=torch.float64)
        self.counted = torch.zeros(batch, dtype=torch.float64)

    def observe(self, states: torch.Tensor) -> None:
        """Count the token each row's step produced (`states` (batch, tokens, layers), its last position)."""
        if self.spent.shape[0] != states.shape[0]:
            self.reset(states.shape[0])
        self.spent += self.lookup[states[:, -1].long()].sum(-1).double()
        self.counted += 1

    def bias(self) -> torch.Tensor:
        """(batch,) the bias each row runs its next step with."""
        if self.spent.numel() == 0:
            return torch.tensor([self.base_bias])
        excess = (self.spent - self.counted * self.per_token) / self.per_token  # in tokens' worth of cost
        step = self.gain * self.target / self.slope  # bias that moves the ratio by 100%, times the gain
        return (self.base_bias + step * excess).clamp(*self.bias_range).float()

    def ratio(self) -> torch.Tensor:
        """(batch,) the compute ratio each row has run at so far."""
        return self.num_layers * self.counted / self.spent.clamp(min=1e-9)
