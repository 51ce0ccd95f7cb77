"""A preallocated per-layer KV cache, and the rules for the K/V a skipped token leaves.

Keys/values are stored in place (no `torch.cat` per step, as in gpt-fast). A step writes its tokens at
`[start, end)`; `truncate` drops positions (lossless mode's rejected drafts) without recomputing the kept ones.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Self

import torch

from dashskip.errors import DashskipError


class Setting(StrEnum):
    """A setting whose values are its members (`what` names it); `parse` refuses others in one line naming them."""

    def __init_subclass__(cls, what: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._what = what

    @classmethod
    def parse(cls, value: str | Setting) -> Self:
        try:
            return cls(value)
        except ValueError:
            names = [f"'{m.value}'" for m in cls]
            raise DashskipError(f"unknown {cls._what} '{value}'; use {', '.join(names[:-1])} or {names[-1]}") from None


class KVRule(Setting, what="K/V rule"):
    """How a token that skips layer i fills its K/V at layer i."""

    COPY = "copy"  # the token's K/V at layer i-1 (the second paper's rule; no compute)
    PROJECT = "project"  # layer i's own K/V projections of the token's incoming hidden state


class KVCacheDtype(Setting, what="K/V cache dtype"):
    """What the cache stores keys/values in. A decode step reads every cached key and value of every layer it runs:
    at 2,048 positions SmolLM2's fp32 cache is ~94 MB a token, about as much as its INT8 weights. 16 bits halve it;
    attention still computes in the model's precision (the compiled kernel widens 8 values at a time)."""

    FLOAT32 = "float32"  # the model's own precision (its dtype, float32 here): exact
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    def dtype(self, model: torch.dtype) -> torch.dtype:
        """The storage dtype for a model computing in `model` (float32: the model's own)."""
        return {KVCacheDtype.BFLOAT16: torch.bfloat16, KVCacheDtype.FLOAT16: torch.float16}.get(self, model)


def fewest_moves(kept: list[int]) -> list[int]:
    """The rows `kept` (of a batch, ascending) in the order `KVCache.keep` moves the fewest of: those already among
    the first len(kept) places stay, the others fill the gaps."""
    count = len(kept)
    movers = iter(r for r in kept if r >= count)
    staying = {r for r in kept if r < count}
    return [r if r in staying else next(movers) for r in range(count)]


class KVCache:
    """Keys/values of every layer, shape (batch, kv_heads, capacity, head_dim), grown on demand.

    A server's batch changes its rows while it runs: `append` adds the rows of another cache (requests whose prompts
    are done), `keep` drops finished ones, both in place. Rows live in a store of `slots` rows (room for more) and
    `keys` / `values` are views of the rows in use, so the rows that stay are copied only where they must move:
    right when a longer row joins, into a gap a finished row left, forward when shared padding is dropped, and
    when the store grows (a copy of a 32-row SmolLM2 cache is ~300 MB; joining used to copy the whole batch three
    times)."""

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
        self.store = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * num_layers)]
        self._use(batch)
        self.length = 0  # positions filled by finished steps
        self.start = 0  # where the step in progress writes
        self.end = 0

    def _use(self, rows: int) -> None:
        """The first `rows` rows of the store are the cache's rows. The views are made with grad mode on: a view
        made under `no_grad` may not be written in grad mode (a training step writes K/V that carry gradients)."""
        n = len(self.store) // 2
        with torch.enable_grad():
            self.keys = [t[:rows] for t in self.store[:n]]
            self.values = [t[:rows] for t in self.store[n:]]

    @property
    def capacity(self) -> int:
        return self.store[0].shape[2]

    @property
    def slots(self) -> int:
        return self.store[0].shape[0]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def begin_step(self, num_tokens: int) -> None:
        self.start, self.end = self.length, self.length + num_tokens
        if self.end > self.capacity:
            self.reserve(max(self.end, 2 * self.capacity))

    def reserve(self, capacity: int, slots: int = 0) -> None:
        """Room for `capacity` positions and `slots` rows; the rows in use are copied into the new store."""
        capacity, slots = max(capacity, self.capacity), max(slots, self.slots)
        if (capacity, slots) == (self.capacity, self.slots):
            return
        rows, length = self.batch, self.length
        self.keys, self.values = [], []  # the views would keep every old tensor alive until the last is copied
        for i, t in enumerate(self.store):
            grown = t.new_zeros(slots, t.shape[1], capacity, t.shape[3])
            grown[:rows, :, :length] = t[:rows, :, :length]
            self.store[i] = grown
        self._use(rows)

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

    def keep(self, rows: list[int]) -> None:
        """Only these rows, row j of the result being row `rows[j]`, in place. Each row either stays where it is or
        comes from past the kept ones (`fewest_moves` gives such an order): a rule stricter than needed, which
        no row is overwritten under before it moves, and only the rows that fill a gap are copied."""
        count = len(rows)
        if len(set(rows)) != count or any(not 0 <= src < self.batch for src in rows):
            raise DashskipError(f"keep: rows {rows} are not distinct rows of a cache of {self.batch}")
        if any(src != dest and src < count for dest, src in enumerate(rows)):
            raise DashskipError("keep: a row moves onto one that is kept; order the rows with fewest_moves")
        for dest, src in enumerate(rows):
            if dest != src:
                for t in self.store:
                    t[dest, :, : self.length] = t[src, :, : self.length]
        self._use(len(rows))

    def append(self, other: KVCache, room: int = 0, most: int = 0) -> int:
        """`other`'s rows after these, in place, each row's positions right-aligned with this cache's (the shorter
        side gains empty positions in front: left padding, zeros); room for `room` more positions after them, and
        for more rows (doubling, up to `most` if given: the most rows the caller will ever hold). Returns how many
        empty positions this cache's rows gained in front (their padding grows by as much; they are copied then)."""
        shift = max(other.length - self.length, 0)
        length = self.length + shift
        rows, slots = self.batch, self.batch + other.batch
        if slots > self.slots:
            slots = max(slots, min(2 * self.slots, most) if most else 2 * self.slots)
        self.reserve(length + room, slots)
        pad = length - other.length
        for t, o in zip(self.store, (*other.keys, *other.values), strict=True):
            if shift:  # this cache's rows move right; through a copy, as source and destination overlap
                t[:rows, :, shift:length] = t[:rows, :, : self.length].clone()
                t[:rows, :, :shift] = 0
            t[rows : rows + other.batch, :, :pad] = 0  # no stale values, even where a mask gives them weight 0
            t[rows : rows + other.batch, :, pad:length] = o[:, :, : other.length]
        self._use(rows + other.batch)
        self.length = self.start = self.end = length
        return shift

    def drop_front(self, count: int) -> None:
        """Forget the first `count` positions of every row (padding no row uses any more); positions move left."""
        if count <= 0:
            return
        for t in self.store:
            t[: self.batch, :, : self.length - count] = t[: self.batch, :, count : self.length].clone()
        self.length = self.start = self.end = self.length - count
