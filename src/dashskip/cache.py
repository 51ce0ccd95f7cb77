"""A preallocated per-layer KV cache that also implements the skipped-token K/V rules.

transformers' attention calls `cache.update(key, value, layer_idx)` with the
keys/values of the tokens it just projected; we store them in place (no
`torch.cat` per step, as in gpt-fast) and, under the 'copy' rule, overwrite
the rows of tokens that skip this layer with their entries from the layer
below, so later tokens attend to what the rule says they should.
"""

from __future__ import annotations

from enum import StrEnum

import torch

from dashskip.errors import DashskipError


class KVRule(StrEnum):
    """How a token that skips layer i fills its K/V at layer i."""

    COPY = "copy"  # the token's K/V at layer i-1 (the second paper's rule; no compute)
    PROJECT = "project"  # layer i's own K/V projections of the token's incoming hidden state

    @classmethod
    def parse(cls, value: str | KVRule) -> KVRule:
        try:
            return cls(value)
        except ValueError:
            raise DashskipError(f"unknown K/V rule '{value}'; use 'copy' or 'project'") from None


class KVCache:
    """Keys/values of every layer, shape (batch, kv_heads, capacity, head_dim), grown on demand."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        capacity: int = 256,
    ) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # positions filled by finished steps
        self.start = 0  # where the step in progress writes
        self.end = 0
        self.copy_rows: torch.Tensor | None = None  # (batch, step) bool: rows skipping the current layer

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def begin_step(self, num_tokens: int) -> None:
        self.start, self.end = self.length, self.length + num_tokens
        if self.end > self.capacity:
            grow = max(self.end, 2 * self.capacity) - self.capacity
            for store in (self.keys, self.values):
                for i, t in enumerate(store):
                    pad = t.new_zeros(t.shape[0], t.shape[1], grow, t.shape[3])
                    store[i] = torch.cat([t, pad], dim=2)

    def end_step(self) -> None:
        self.length = self.end
        self.copy_rows = None

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.keys[layer_idx][:, :, self.start : self.end] = key
        self.values[layer_idx][:, :, self.start : self.end] = value

    def copy_from_below(self, layer_idx: int) -> None:
        """Copy rule for a layer every token of the step skips."""
        s, e = self.start, self.end
        self.keys[layer_idx][:, :, s:e] = self.keys[layer_idx - 1][:, :, s:e]
        self.values[layer_idx][:, :, s:e] = self.values[layer_idx - 1][:, :, s:e]

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by transformers' attention: store this step's K/V and return the whole prefix."""
        if self.copy_rows is not None:
            rows = self.copy_rows[:, None, :, None]
            s, e = self.start, self.end
            key = torch.where(rows, self.keys[layer_idx - 1][:, :, s:e], key)
            value = torch.where(rows, self.values[layer_idx - 1][:, :, s:e], value)
        self.write(layer_idx, key, value)
        return self.keys[layer_idx][:, :, : self.end], self.values[layer_idx][:, :, : self.end]
