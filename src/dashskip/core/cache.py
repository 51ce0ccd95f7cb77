"""A preallocated per-layer KV cache, and the rules for the K/V a skipped token leaves.

Keys/values are stored in place (no `torch.cat` per step, as in gpt-fast). A step writes its tokens at
`[start, end)`; `truncate` drops positions (lossless mode's rejected drafts) without recomputing the kept ones.
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

    @classmethod
    def of(cls, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> KVCache:
        """A cache around existing per-layer tensors, `length` positions filled."""
        cache = cls.__new__(cls)
        cache.keys, cache.values = keys, values
        cache.length = cache.start = cache.end = length
        return cache

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def begin_step(self, num_tokens: int) -> None:
        self.start, self.end = self.length, self.length + num_tokens
        if self.end > self.capacity:
            self.reserve(max(self.end, 2 * self.capacity))

    def reserve(self, capacity: int) -> None:
        grow = capacity - self.capacity
        if grow <= 0:
            return
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                store[i] = torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], grow, t.shape[3])], dim=2)

    def end_step(self) -> None:
        self.length = self.end

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions; later steps overwrite the rest."""
        if not 0 <= length <= self.length:
            raise DashskipError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = self.start = self.end = length

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """This step's K/V at a layer, (batch, kv_heads, tokens, head_dim); with `rows` (batch, tokens) bool only
        those tokens' entries change."""
        keys = self.keys[layer_idx][:, :, self.start : self.end]
        values = self.values[layer_idx][:, :, self.start : self.end]
        if rows is None:
            keys.copy_(key)
            values.copy_(value)
        else:
            where = rows[:, None, :, None]
            keys.copy_(torch.where(where, key, keys))
            values.copy_(torch.where(where, value, values))

    def copy_from_below(self, layer_idx: int, rows: torch.Tensor | None = None) -> None:
        """The copy rule: this step's tokens (or only `rows`) take their K/V of the layer below."""
        s, e = self.start, self.end
        self.write(layer_idx, self.keys[layer_idx - 1][:, :, s:e], self.values[layer_idx - 1][:, :, s:e], rows)

    def filled(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every key/value up to the end of the step in progress."""
        return self.keys[layer_idx][:, :, : self.end], self.values[layer_idx][:, :, : self.end]

    def rows(self, index: torch.Tensor, first: int = 0, room: int = 0) -> KVCache:
        """A new cache of the rows `index`, positions from `first` on, with `room` free positions after them."""
        take = slice(first, self.length)
        grown = [
            torch.cat([t[index, :, take], t.new_zeros(len(index), t.shape[1], room, t.shape[3])], dim=2)
            for t in (*self.keys, *self.values)
        ]
        n = len(self.keys)
        return KVCache.of(grown[:n], grown[n:], self.length - first)

    def pad_left(self, count: int) -> KVCache:
        """The same rows with `count` empty positions in front (left padding); positions shift by `count`."""
        if count == 0:
            return self
        padded = [torch.cat([t.new_zeros(t.shape[0], t.shape[1], count, t.shape[3]), t], dim=2)
                  for t in (*self.keys, *self.values)]  # fmt: skip
        n = len(self.keys)
        return KVCache.of(padded[:n], padded[n:], self.length + count)

    @staticmethod
    def stack(caches: list[KVCache]) -> KVCache:
        """Rows of caches of one length side by side; capacity is the smallest of theirs."""
        length = caches[0].length
        if any(c.length != length for c in caches):
            raise DashskipError("only caches of one length can be stacked; pad them first")
        capacity = min(c.capacity for c in caches)
        keys = [torch.cat([c.keys[i][:, :, :capacity] for c in caches]) for i in range(len(caches[0].keys))]
        values = [torch.cat([c.values[i][:, :, :capacity] for c in caches]) for i in range(len(caches[0].values))]
        return KVCache.of(keys, values, length)
