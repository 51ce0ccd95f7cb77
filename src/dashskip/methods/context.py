"""What every method is built from: the model's engine, tokenizer and cost table, and the measurements methods
share (calibration, layer sensitivity), each measured once per model on WikiText-2 *validation* text and cached.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dashskip.core.costs import CostTable
from dashskip.core.files import cache_dir
from dashskip.data import load_text, token_windows
from dashskip.errors import DashskipError
from dashskip.measure.calibration import Calibration, calibrate, scales_key
from dashskip.models.backbone import Backbone
from dashskip.runtime.engine import Engine


@dataclass
class MethodContext:
    """A loaded model as methods see it."""

    engine: Engine
    tokenizer: Any
    model: Any  # the transformers model (calibration hooks run on it, unmodified)
    fingerprint: str
    costs: CostTable
    policy: Any = None  # the DASH policy loaded with the model, if any (methods.dash.policy.DashPolicy)
    data_dir: str | Path | None = None
    progress: bool = True
    wall_clock: bool = True  # DASH's speedup is decode wall clock on this machine (else: a compute ratio)

    @property
    def backbone(self) -> Backbone:
        return self.engine.backbone


def validation_windows(ctx: MethodContext, num: int, length: int, seed: int) -> torch.Tensor:
    """Windows of WikiText-2 *validation* text: baselines calibrate there, the test split stays for evaluation."""
    return token_windows(ctx.tokenizer, load_text("wikitext2-valid", ctx.data_dir), num, length, seed=seed)


def calibration_for(ctx: MethodContext) -> Calibration:
    """The model's calibration (skip scales, layer and sublayer similarity), measured once and cached.

    128 windows of 256 tokens, as `dashskip calibrate` defaults to (the paper's N = 128), so the similarity
    baselines need no calibration file.
    """
    path = cache_dir() / "calibration" / f"{ctx.fingerprint}.json"
    if path.exists():
        return Calibration.load(path)
    windows = validation_windows(ctx, 128, 256, seed=0)
    result = calibrate(ctx.model, windows, ctx.fingerprint, progress=ctx.progress, meta={"data": "wikitext2-valid"})
    result.save(path)
    return result



def reachable(method: str, ratio: float, speedup: float, tolerance: float, top: float) -> None:
    """Refuse an operating point a method cannot reach within `tolerance` (the sweep marks such cells)."""
    if abs(ratio - speedup) > tolerance * speedup:
        raise DashskipError(
            f"{method} reaches compute ratios up to {top:.2f} on this model and cost table; {speedup} is out of "
            f"reach within {tolerance:.0%}"
        )


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:8]


def scales_digest(scales: torch.Tensor) -> str:
    return cache_key(scales_key(scales))
