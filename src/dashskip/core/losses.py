"""Per-token losses shared by evaluation, training and the baselines' calibrations."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of the next token: (batch, tokens-1)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1
    )
