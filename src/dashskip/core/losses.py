"""Per-token losses shared by evaluation, training and the baselines' calibrations."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of the next token: (batch, tokens-1)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1
    )


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(reference || prediction) of the next-token distributions: (batch, tokens-1).

    The fidelity of a cheaper path to the full model: unlike the NLL of the one sampled label, it scores the whole
    predicted distribution, so it cannot be lucky on a single token.
    """
    reference = torch.log_softmax(reference_logits[:, :-1].float(), -1)
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return (reference.exp() * (reference - logp)).sum(-1).clamp(min=0)
