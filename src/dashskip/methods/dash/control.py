"""Operating points that hold: each sequence's cost bias is steered so that it runs at the compute ratio asked.

A policy's operating points are calibrated once, on WikiText-2: the cost bias that gave 1.67x there gives
1.26-1.58x on a chat prompt, a held-out paragraph or an ARC question. The controller watches what each row
actually spends and moves that row's bias (integral control on its cumulative excess cost), so the policy still
ranks tokens and layers as it learned and only its overall rate is corrected. The quantity steered is the one
reported: layers / mean executed cost per counted token, with the same cost table.

Generation counts the token each step produces (a step's last position; the prompt's other positions are not
reported). A controller is per sequence: it starts over at every prefill.

Scoring a window (perplexity, a multiple-choice question) is one step, with no earlier token to correct from:
the window is scored again (`Engine.score`) with each row's bias moved by the secant method on its measured
ratio, kept inside the bracket its passes have found, until every row is within `WINDOW_TOLERANCE` or after
`WINDOW_PASSES` passes (usually two or three; a short window's ratio moves in steps and takes more), the last
of them at the best bias tried.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dashskip.core.costs import CostTable
from dashskip.core.decisions import StepInfo

# Bias moved per token's worth of excess cost, as a fraction of the bias that the ratio curve says moves the ratio by
# 100%: 1.0 corrects an excess on the next token if the input responds as the calibration text did. Measured on
# SmolLM2 over chat, code, PTB, LAMBADA and XSum prompts (benchmarks/operating_points.py): 0.6 and 1.5 track as
# well (max error 1.3% / 1.2% at 48 tokens); lower gains undershoot on inputs far from the calibration text.
GAIN = 1.0
WINDOW_TOLERANCE = 0.01  # a scored window's ratio this close to the target (relative) is kept
WINDOW_RULE = "secant, bracketed, the last pass at the best bias tried"  # part of what cached window scores used
WINDOW_PASSES = 8  # most passes over one window (5 left lm-eval's short requests up to 6% off at 1.5)


@dataclass
class RateControl:
    """Per-row cost-bias control toward `target` (compute ratio) for a policy decided with `costs`."""

    target: float
    base_bias: float
    costs: CostTable  # the table the ratio is reported with (decode costs)
    num_layers: int
    slope: float = 1.0  # d(ratio)/d(bias) near base_bias
    bias_range: tuple[float, float] = (-50.0, 50.0)
    gain: float = GAIN
    spent: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (batch,) cost of counted tokens
    counted: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (batch,) tokens counted
    window_bias: torch.Tensor | None = None  # (batch,) bias of the next pass over a scored window
    passes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (bias, ratio) per pass
    applied: torch.Tensor = field(default_factory=lambda: torch.zeros(1))  # (batch,) bias of the step that ran
    window_slope: torch.Tensor = field(default_factory=lambda: torch.ones(1))  # (batch,) d(ratio)/d(bias) so far

    def __post_init__(self) -> None:
        self.per_token = self.num_layers / self.target  # the cost per token that reports `target`

    def compute_ratio(self) -> float:
        """The ratio its counted tokens ran at, all rows together (1.0 before any)."""
        spent = float(self.spent.sum())
        return self.num_layers * float(self.counted.sum()) / spent if spent > 0 else 1.0

    def reset(self, batch: int) -> None:
        self.spent = torch.zeros(batch, dtype=torch.float64)
        self.counted = torch.zeros(batch, dtype=torch.float64)

    def observe(self, states: torch.Tensor) -> None:
        """Count the token each row's step produced (`states` (batch, tokens, layers), its last position)."""
        if self.spent.shape[0] != states.shape[0]:
            self.reset(states.shape[0])
        self.spent += self.costs.token_costs(states[:, -1]).double()
        self.counted += 1

    def bias(self) -> torch.Tensor:
        """(batch,) the bias each row runs its next step with."""
        if self.window_bias is not None:
            return self.window_bias
        if self.spent.numel() == 0:
            return torch.tensor([self.base_bias])
        excess = (self.spent - self.counted * self.per_token) / self.per_token  # in tokens' worth of cost
        step = self.gain * self.target / self.slope  # bias that moves the ratio by 100%, times the gain
        return (self.base_bias + step * excess).clamp(*self.bias_range).float()

    def retarget(self, states: torch.Tensor, valid: torch.Tensor | None) -> bool:
        """After a scored window: move each row's bias toward the target and say whether to score it again."""
        costs = self.costs.token_costs(states).double()  # (batch, tokens)
        weight = torch.ones_like(costs) if valid is None else valid.double()
        ratio = self.num_layers * weight.sum(-1) / (costs * weight).sum(-1).clamp(min=1e-9)
        bias = self.applied.double().expand(ratio.shape)
        self.passes.append((bias, ratio))
        off = (ratio / self.target - 1).abs() > WINDOW_TOLERANCE
        if not bool(off.any()) or len(self.passes) >= WINDOW_PASSES:
            self.window_bias, self.passes = None, []
            return False
        biases, ratios = (torch.stack(column) for column in zip(*self.passes, strict=True))  # (passes, batch)
        if len(self.passes) == WINDOW_PASSES - 1:
            # The last pass runs each row at the best bias it has tried: a short window's ratio moves in steps,
            # and a last guess can land further off than an earlier pass did (1.43 for 1.5 on lm-eval's pairs).
            best = (ratios / self.target - 1).abs().argmin(0)
            if bool((best == len(self.passes) - 1)[off].all()):  # this pass is already each row's best
                self.window_bias, self.passes = None, []
                return False
            self.window_bias = torch.where(off, biases.gather(0, best[None])[0], bias).float()
            return True
        if len(self.passes) == 1:
            self.window_slope = torch.full_like(ratio, self.slope)
        else:  # the secant through this row's last two passes; where the ratio did not move, a 4x longer step
            (b0, r0), (b1, r1) = self.passes[-2], self.passes[-1]
            moved = (r1 - r0).abs() > 1e-4
            secant = ((r1 - r0) / torch.where(moved, b1 - b0, 1.0)).clamp(min=1e-3)
            self.window_slope = torch.where(moved, secant, self.window_slope / 4)
        guess = bias + (self.target - ratio) / self.window_slope
        # Once a row's passes bracket the target (the ratio rises with the bias), a guess outside the bracket
        # is replaced by its midpoint: steps of a short window's ratio threw the secant as far as the clamp.
        low = torch.where(ratios < self.target, biases, float("-inf")).amax(0)
        high = torch.where(ratios > self.target, biases, float("inf")).amin(0)
        bracketed = torch.isfinite(low) & torch.isfinite(high) & (low < high)
        outside = bracketed & ((guess <= low) | (guess >= high))
        guess = torch.where(outside, (low + high) / 2, guess)
        self.window_bias = torch.where(off, guess, bias).clamp(*self.bias_range).float()
        return True


@dataclass
class SequenceState:
    """What one sequence keeps between its steps, owned by what runs it (a `generate` call's decider, a server
    request's, a vLLM request in the plugin's request table), never by the policy, whose one scorer serves every
    sequence: its rate controller (target, the bias of its next step, the totals that bias is steered by, or only
    counts where it does not steer) and whether the step being run counts. The asynchronous decision pending
    between two layers lives within a step."""

    control: RateControl
    counting: bool = False  # whether the step being run produces a token the controller counts

    def begin(self, step: StepInfo) -> torch.Tensor:
        """(rows,) the bias each of the sequence's rows runs this step with; a prefill starts the sequence over."""
        if step.prefill:  # a new sequence: its spending starts over
            self.control.reset(step.positions.shape[0])
        # Steps that produce a token count it (the prompt's last position, a decode step); a chunk of a prompt
        # that goes on does not (a chunked prompt then runs as it does whole).
        self.counting = step.produces
        self.control.applied = bias = self.control.bias()
        return bias

    def end(self, states: torch.Tensor) -> None:
        """After the step, with the (rows, tokens, layers) states that ran: the controller counts the token each
        row produced (its last position)."""
        if self.counting:
            self.control.observe(states)

    def again(self, states: torch.Tensor, valid: torch.Tensor | None) -> bool:
        """After a scored window: whether to score it again, the controller having moved the bias (`Engine.score`)."""
        return self.control.retarget(states, valid)
