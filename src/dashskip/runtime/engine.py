"""The layer-wise engine: prefill and cached decode with a state per token and layer.

Flat and explicit, in the style of gpt-fast: embed, then for each layer ask the decider, run the layer in the
states it chose (`models.layer.DecoderLayer`; a skipped row's output is `scale_i * x`, its K/V by the engine's
rule), then norm and head. One step = one call of `step()`. Everything a step needs travels with it (a
`StepContext`, a `Rows` per layer): the engine holds no per-step state, so its callers may interleave steps of
different sessions and deciders freely.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from dashskip.core import kernels as K
from dashskip.core.cache import KVCache, KVCacheDtype, KVRule
from dashskip.core.context import Rows, StateChoice, StepContext
from dashskip.core.decisions import Decider, FullFor, StepInfo, decide_and_run
from dashskip.core.states import State, spec
from dashskip.errors import DashskipError
from dashskip.models.backbone import Backbone

PLANS_KEPT = 8  # fixed schedules whose layers' compiled calls an engine keeps (a sweep runs many, decode one)


def build_mask(
    key_valid: torch.Tensor | None, start: int, end: int, window: int | None, batch: int
) -> torch.Tensor | None:
    """Boolean (batch, 1, tokens, keys) mask for sdpa, or None where sdpa's own causal path gives the same result."""
    tokens = end - start
    fits_window = window is None or end <= window
    if key_valid is None and fits_window and (tokens == 1 or start == 0):
        return None
    q = torch.arange(start, end)[:, None]
    k = torch.arange(end)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[None].expand(batch, tokens, end)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :end].bool()
        # A left-padding query sees no key at all; let it see everything rather than produce NaN.
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


def key_begins(key_valid: torch.Tensor | None, end: int) -> torch.Tensor | None:
    """Each row's first real key slot if every row's real keys are one run up to `end` (left padding), else None;
    an empty tensor when there is no padding at all."""
    if key_valid is None:
        return torch.empty(0, dtype=torch.long)
    valid = key_valid[:, :end]
    begins = (~valid).long().cumprod(-1).sum(-1)  # leading padding per row
    if not bool((valid.sum(-1) == end - begins).all()):
        return None
    return begins.contiguous()


@dataclass
class StepResult:
    hidden: torch.Tensor  # (batch, tokens, hidden), after the last layer (before norm)
    states: torch.Tensor  # (batch, tokens, layers) int8 states actually run
    session: Session | None = None  # `Engine.score`: the fresh session the kept pass filled (to continue from)


@dataclass
class Session:
    """A KV cache plus the padding mask of everything it holds."""

    cache: KVCache
    key_valid: torch.Tensor | None = None  # (batch, length) bool; None = no padding anywhere

    @property
    def length(self) -> int:
        return self.cache.length

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (rejected drafts); the kept ones are not recomputed."""
        self.cache.truncate(length)
        if self.key_valid is not None:
            self.key_valid = self.key_valid[:, :length]

    def valid(self) -> torch.Tensor:
        """(batch, length) bool: which filled positions hold real tokens."""
        if self.key_valid is None:
            return torch.ones(self.cache.batch, self.cache.length, dtype=torch.bool)
        return self.key_valid[:, : self.cache.length]

    def keep(self, rows: list[int]) -> None:
        """Only these rows (the others finished), row j being `rows[j]`, in place (`KVCache.keep`: an order from
        `fewest_moves`). Positions that are padding in every kept row are dropped once they are a quarter of the
        cache (each drop moves every row; rarer drops cost less)."""
        valid = self.valid()[torch.tensor(rows, dtype=torch.long)]
        self.cache.keep(rows)
        first = int((~valid).all(0).long().cumprod(0).sum())  # leading positions no kept row uses
        if 4 * first >= self.cache.length:
            self.cache.drop_front(first)
            valid = valid[:, first:]
        self.key_valid = None if bool(valid.all()) else valid

    def append(self, other: Session, room: int = 0, most: int = 0) -> None:
        """`other`'s rows after these, in place, each row's positions right-aligned (shorter ones left-padded): a
        sequence that started later decodes in the same step as the others. `room`: positions to reserve after;
        `most`: the most rows this session will hold (`KVCache.append`)."""
        mine, theirs = self.valid(), other.valid()
        shift = self.cache.append(other.cache, room, most)
        length = self.cache.length
        mine = torch.cat([torch.zeros(mine.shape[0], shift, dtype=torch.bool), mine], dim=1)
        theirs = torch.cat([torch.zeros(theirs.shape[0], length - theirs.shape[1], dtype=torch.bool), theirs], dim=1)
        valid = torch.cat([mine, theirs])
        self.key_valid = None if bool(valid.all()) else valid

    def positions(self, tokens: int) -> torch.Tensor:
        """Position ids of the next `tokens` tokens of every row: real tokens before them, padding not counted."""
        start, batch = self.cache.length, self.cache.batch
        if self.key_valid is None:
            return torch.arange(start, start + tokens).expand(batch, tokens)
        return (self.key_valid.long().cumsum(-1) - 1)[:, start : start + tokens].clamp(min=0)

    def extend_valid(self, attention_mask: torch.Tensor | None, tokens: int) -> None:
        """Record which of the step's `tokens` new tokens are real (`attention_mask`, None: all)."""
        batch, length = self.cache.batch, self.cache.length
        valid = None if attention_mask is None else attention_mask.bool()
        if self.key_valid is None and (valid is None or bool(valid.all())):
            return
        if self.key_valid is None:
            self.key_valid = torch.ones(batch, length, dtype=torch.bool)
        step_valid = valid if valid is not None else torch.ones(batch, tokens, dtype=torch.bool)
        self.key_valid = torch.cat([self.key_valid[:, :length], step_valid], dim=1)


class Engine:
    """Runs a `Backbone` token by token and layer by layer with per-token execution states."""

    def __init__(
        self,
        backbone: Backbone,
        scales: torch.Tensor | None = None,
        kv_rule: str | KVRule = "project",
        kv_cache_dtype: str | KVCacheDtype = KVCacheDtype.FLOAT32,
    ) -> None:
        self.backbone = backbone
        self.kv_cache_dtype = KVCacheDtype.parse(kv_cache_dtype)
        n = backbone.num_layers
        self.scales = torch.ones(n) if scales is None else torch.as_tensor(scales, dtype=torch.float32)
        if self.scales.shape != (n,):
            raise DashskipError(f"{self.scales.numel()} skip scales given for a model with {n} layers")
        self.kv_rule = KVRule.parse(kv_rule)
        self._warned_nonfinite = False
        self._planned: dict[tuple, list[Any] | None] = {}  # `_planned_calls`: the latest-used few plans
        self._planned_from: tuple | None = None  # the weights they were built from

    def new_session(self, batch: int, capacity: int = 256) -> Session:
        cfg = self.backbone.config
        cache = KVCache(
            self.backbone.num_layers,
            batch,
            cfg.num_key_value_heads,
            self.backbone.layers[0].head_dim,
            self.kv_cache_dtype.dtype(self.backbone.dtype),
            self.backbone.device,
            capacity,
        )
        return Session(cache)

    def context(self, session: Session, x: torch.Tensor, positions: torch.Tensor) -> StepContext:
        """Rope, masks and padding of a step whose K/V `session.cache.begin_step` placed."""
        bb, cache = self.backbone, session.cache
        masks = {w: build_mask(session.key_valid, cache.start, cache.end, w, x.shape[0]) for w in set(bb.windows)}
        return StepContext(positions, bb.rope(x, positions), masks, cache, self.kv_rule,
                           key_begins(session.key_valid, cache.end))  # fmt: skip

    def _warn_nonfinite(self, states: torch.Tensor) -> None:
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            layers = sorted({int(i) for i in torch.nonzero(states != State.FULL)[:, -1]})
            warnings.warn(
                f"non-finite hidden state after a skipped/quantized path (layers {layers}); those tokens were rerun "
                "in full (warned once per engine)",
                RuntimeWarning,
                stacklevel=3,
            )

    def run_layer(self, i: int, rows: Rows, x: torch.Tensor, step: StepContext, scale: torch.Tensor, plan=None):
        """Layer i for every token of the step, each in its state (a subclass may add to a layer's output)."""
        bb = self.backbone
        layer_type, window = bb.layer_types[i], bb.windows[i]
        return bb.layers[i](rows, x, step, step.ropes[layer_type], step.masks[window], scale, plan)

    def _layers(
        self, x: torch.Tensor, decider: Decider, info: StepInfo, step: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        traits = decider.traits
        decider.begin(info)
        scales = self.scales if traits.skip_scales is None else traits.skip_scales
        plan = traits.sublayers  # a planned layer runs its kept sublayers in full

        def run(i: int, choice: StateChoice, x: torch.Tensor) -> torch.Tensor:
            return self.run_layer(i, Rows.of(choice), x, step, scales[i], plan.get(i))

        # A subclass that adds to a layer's output (`run_layer`) or a sublayer plan needs the layers one by one.
        whole = not plan and type(self).run_layer is Engine.run_layer
        planned = (lambda states, x: self._run_planned(states, x, step)) if whole else None
        return decide_and_run(x, decider, self.backbone.num_layers, run, held_full=list(plan), run_planned=planned)

    def _planned_calls(self, states: list[int], x: torch.Tensor) -> list[Any] | None:
        """Each layer's one compiled call in its planned state (`DecoderLayer.one_call`), kept for the next step
        with the same plan, rows, kernel choices and weights (asking every layer for it cost ~0.7 ms a step). The
        latest-used few plans are kept; a weight changed in place or replaced drops them all (and the packed
        weights they hold)."""
        rows = x.numel() // x.shape[-1]
        key = (tuple(states), K.row_bucket(rows), K.CHOICE.generation, K.activations(), torch.get_num_threads())
        layers = self.backbone.layers
        weights = tuple(p.current() for layer in layers for p in layer.projections())
        if weights != self._planned_from:
            self._planned.clear()
            self._planned_from = weights
        if key in self._planned:
            self._planned[key] = self._planned.pop(key)  # the most recently used last
            return self._planned[key]
        calls = [None if spec(s).skips else layer.one_call(s, x) for layer, s in zip(layers, states, strict=True)]
        found = None if any(c is None for c in calls) else calls
        if len(self._planned) >= PLANS_KEPT:
            self._planned.pop(next(iter(self._planned), None), None)
        self._planned[key] = found
        return found

    def _run_planned(self, states: list[int], x: torch.Tensor, step: StepContext) -> torch.Tensor | None:
        """Every layer in its planned state as one compiled call (csrc/fused_layer.cpp `run_layers`): what each
        layer's own compiled call computes, without the Python between layers. None where a layer cannot run as
        one compiled call (a skip, padding inside a row, many rows, a kernel with no
        native form), and the layers run one by one."""
        bb, cache = self.backbone, step.cache
        if not K.layer_rows(x) or not step.plain_causal:
            return None
        fused = self._planned_calls(states, x)
        if fused is None:
            return None
        ropes = {kind: (cos.contiguous(), sin.contiguous()) for kind, (cos, sin) in step.ropes.items()}
        cos = [ropes[kind][0] for kind in bb.layer_types]
        sin = [ropes[kind][1] for kind in bb.layer_types]
        return K.extension().run_layers(fused, x.contiguous(), cos, sin, cache.keys, cache.values, cache.start,
                                        step.key_begins)  # fmt: skip

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,
        session: Session,
        decider: Decider | None = None,
        attention_mask: torch.Tensor | None = None,
        produces: bool = True,
    ) -> StepResult:
        """Run `input_ids` (batch, tokens) through every layer, appending their K/V to the session.

        `attention_mask` (batch, tokens), 1 for real tokens, 0 for padding, covers only the new tokens.
        `produces`: the last position gives a new token (False for a chunk of a prompt that goes on).
        """
        bb, cache = self.backbone, session.cache
        batch, tokens = input_ids.shape
        if tokens == 0:
            raise DashskipError("empty input: give at least one token")
        if batch != cache.batch:
            raise DashskipError(f"a batch of {batch} rows for a session of {cache.batch}")
        session.extend_valid(attention_mask, tokens)
        decider = decider or Decider()
        positions = session.positions(tokens)
        cache.begin_step(tokens)
        x = bb.embed(input_ids)
        step = self.context(session, x, positions)
        info = StepInfo(positions=positions, prefill=cache.start == 0, num_layers=bb.num_layers, produces=produces)
        hidden, states = self._layers(x, decider, info, step)
        # One check per step, not per layer: a skipped or quantized path that blew up is rare, and rerunning
        # the affected tokens in full (overwriting this step's K/V) is cheaper than checking 30 layers per token.
        bad = ~torch.isfinite(hidden).all(-1)
        if bool(bad.any()):
            self._warn_nonfinite(states[bad])
            hidden, states = self._layers(x, FullFor(decider, bad), info, step)
        cache.end_step()
        decider.end(states)
        return StepResult(hidden, states)

    def score(
        self,
        input_ids: torch.Tensor,
        decider: Decider | None = None,
        attention_mask: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> StepResult:
        """One window (perplexity, a question and its answers) in one step on a fresh session, scored again
        while the decider asks to (a rate controller holding each window at the ratio asked). `valid`: the
        tokens that count (default: `attention_mask`'s; right padding need not be masked to be left out)."""
        decider = decider or Decider()
        if valid is None and attention_mask is not None:
            valid = attention_mask.bool()
        while True:
            session = self.new_session(*input_ids.shape)
            result = self.step(input_ids, session, decider, attention_mask)
            if not decider.again(result.states, valid):
                result.session = session
                return result
