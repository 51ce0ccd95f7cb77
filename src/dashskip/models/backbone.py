"""A transformers decoder LLM seen as the engine drives it: embed -> L layers -> norm -> head.

The layers are `layer.DecoderLayer`s built from the model's own weights by its family's file; the embedding,
the final norm and the rotary embedding are the transformers modules, called as they are. Nothing of the
transformers model is changed: it computes what it computed before, bit for bit.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from dashskip.core.handlers import BF16WeightOnly, Handler
from dashskip.core.linear import Linear
from dashskip.core.states import State, spec
from dashskip.errors import DashskipError
from dashskip.models import family_for
from dashskip.models.layer import DecoderLayer


def head_handlers() -> dict[str, Handler]:
    """The LM head's precisions: full (exact, default), bf16, INT8 weight-only."""
    return {"full": spec(State.FULL).handler, "bf16": BF16WeightOnly(), "int8": spec(State.INT8).handler}


HEAD_PRECISIONS = tuple(head_handlers())


class Backbone:
    """embed -> layers -> norm -> head, with rope per layer type and the sliding window of each layer."""

    def __init__(self, model: Any) -> None:
        self.family = family_for(model.config)
        self.model = model
        self.config = model.config
        inner = model.model
        self.embed_tokens: nn.Module = inner.embed_tokens
        self.hf_layers: nn.ModuleList = inner.layers
        self.norm: nn.Module = inner.norm
        self.lm_head: nn.Module = model.lm_head
        self.rotary_emb: nn.Module = inner.rotary_emb
        self.num_layers = len(self.hf_layers)
        types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if types is None:
            types = ["sliding_attention" if window else "full_attention"] * self.num_layers
        self.layer_types: list[str] = list(types)
        self.windows: list[int | None] = [window if t == "sliding_attention" else None for t in self.layer_types]
        self.layers = [
            DecoderLayer(i, self.family.layer_parts(layer, self.config, self.windows[i]))
            for i, layer in enumerate(self.hf_layers)
        ]
        self._rope_takes_type = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        self.softcap: float | None = getattr(self.config, "final_logit_softcapping", None)
        self.head = Linear([self.lm_head.weight], [getattr(self.lm_head, "bias", None)])
        self.heads = head_handlers()
        self.head_precision = "full"

    def set_head(self, precision: str) -> None:
        """Run the LM head in full (default, exact), bf16, or INT8 weight-only.

        The head reads vocab x hidden weights for every token, a fixed cost layer skipping cannot touch
        (SmolLM2: ~5 ms of ~45 ms per token in fp32); the low-precision heads are options whose quality cost
        is measured in docs/benchmarks.md.
        """
        self.check_head(precision)
        self.head_precision = precision

    def check_head(self, precision: str) -> None:
        if precision not in self.heads:
            raise DashskipError(f"unknown head precision '{precision}'; choose one of {', '.join(self.heads)}")

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rope(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin for every layer type present, computed once per step."""
        out = {}
        for layer_type in set(self.layer_types):
            if self._rope_takes_type:
                out[layer_type] = self.rotary_emb(hidden, position_ids, layer_type)
            else:
                out[layer_type] = self.rotary_emb(hidden, position_ids)
        return out

    def logits(self, hidden: torch.Tensor, precision: str | None = None) -> torch.Tensor:
        """Logits through the head at `precision` (default: the one set with `set_head`)."""
        precision = precision or self.head_precision
        self.check_head(precision)
        logits = self.head.run_handler(self.heads[precision], self.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def linears(self) -> list[Linear]:
        return [lin for layer in self.layers for lin in layer.linears().values()]
