"""What a model family is to dashskip: the model types it covers, how its layer is built, where its pieces are.

One file per family (`llama.py`, `gemma3.py`) defines one `Family`; `models/__init__.py` lists them. Adding a
family is that file and a line there (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from dashskip.models.layer import LayerParts


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]  # transformers' `config.model_type` values this family covers
    layer_parts: Callable[[nn.Module, Any, int | None], LayerParts]  # (transformers layer, config, window) -> parts
    mid_residual: str  # the layer module whose *input* is the residual stream between attention and MLP
