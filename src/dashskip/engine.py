"""The layer-wise engine: prefill and cached decode with a state per token and layer.

Flat and explicit, in the style of gpt-fast: embed, then for each layer ask the
decider, run the layer (the flat Llama-family layer where every row shares a state, else the transformers
layer; or skip it: `scale_i * x`, leaving K/V by the chosen rule), then norm and head. One step = one call of `step()`.
A decider with a sublayer plan (AdaSkip) has its planned layers run here
sublayer by sublayer, from the layer's own modules.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from dashskip.backbone import Backbone
from dashskip.cache import KVCache, KVRule
from dashskip.decisions import Decider, StateChoice, StepInfo, SublayerSkip, inherit_traits
from dashskip.errors import DashskipError
from dashskip.states import State, check_state, check_state_tensor

# Per family, the norms around the two sublayers: (before attention, after it, before the MLP, after it); Gemma3
# norms each sublayer's output as well before adding it to the residual stream.
SUBLAYER_NORMS: dict[str, tuple[str, str | None, str, str | None]] = {
    "llama": ("input_layernorm", None, "post_attention_layernorm", None),
    "qwen2": ("input_layernorm", None, "post_attention_layernorm", None),
    "mistral": ("input_layernorm", None, "post_attention_layernorm", None),
    "gemma3_text": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
}


def build_mask(
    key_valid: torch.Tensor | None, start: int, end: int, window: int | None, batch: int, implementation: str
) -> torch.Tensor | None:
    """Boolean (batch, 1, tokens, keys) mask, or None where sdpa's own causal path gives the same result."""
    tokens = end - start
    fits_window = window is None or end <= window
    if key_valid is None and fits_window and (tokens == 1 or (start == 0 and implementation == "sdpa")):
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
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


class _FullFor(Decider):
    """`decider`, except that the given (batch, tokens) rows run every layer in full."""

    def __init__(self, decider: Decider, rows: torch.Tensor) -> None:
        self.decider, self.rows = decider, rows
        inherit_traits(self, decider)

    def begin(self, step: StepInfo) -> None:
        self.decider.begin(step)

    def __call__(self, layer: int, hidden: torch.Tensor, previous: StateChoice) -> StateChoice:
        answer = self.decider(layer, hidden, previous)
        return torch.where(self.rows, int(State.FULL), torch.as_tensor(answer).expand(self.rows.shape))


@dataclass
class StepResult:
    hidden: torch.Tensor  # (batch, tokens, hidden), after the last layer (before norm)
    states: torch.Tensor  # (batch, tokens, layers) int8 states actually run


@dataclass
class Session:
    """A KV cache plus the padding mask of everything it holds."""

    cache: KVCache
    key_valid: torch.Tensor | None = None  # (batch, length) bool; None = no padding anywhere


class Engine:
    """Runs a `Backbone` token by token and layer by layer with per-token execution states."""

    def __init__(
        self, backbone: Backbone, scales: torch.Tensor | None = None, kv_rule: str | KVRule = "project"
    ) -> None:
        self.backbone = backbone
        n = backbone.num_layers
        self.scales = torch.ones(n) if scales is None else torch.as_tensor(scales, dtype=torch.float32)
        if self.scales.shape != (n,):
            raise DashskipError(f"{self.scales.numel()} skip scales given for a model with {n} layers")
        self.kv_rule = KVRule.parse(kv_rule)
        self._warned_nonfinite = False

    def new_session(self, batch: int, capacity: int = 256) -> Session:
        cfg = self.backbone.config
        attn = self.backbone.layers[0].self_attn
        cache = KVCache(
            self.backbone.num_layers,
            batch,
            cfg.num_key_value_heads,
            attn.head_dim,
            self.backbone.dtype,
            self.backbone.device,
            capacity,
        )
        return Session(cache)

    def _positions(self, session: Session, batch: int, tokens: int) -> torch.Tensor:
        start = session.cache.length
        if session.key_valid is None:
            return torch.arange(start, start + tokens).expand(batch, tokens)
        positions = session.key_valid.long().cumsum(-1) - 1
        return positions[:, start : start + tokens].clamp(min=0)

    def _normalize(self, choice: StateChoice, batch: int, tokens: int) -> StateChoice:
        if isinstance(choice, torch.Tensor):
            if choice.shape != (batch, tokens):
                raise DashskipError(
                    f"decider returned states of shape {tuple(choice.shape)}, expected {(batch, tokens)}"
                )
            check_state_tensor(choice)
            first = choice.reshape(-1)[0]
            if bool((choice == first).all()):
                return int(first)
            return choice
        return check_state(choice)

    @staticmethod
    def _expand(choice: StateChoice, batch: int, tokens: int) -> torch.Tensor:
        return choice if isinstance(choice, torch.Tensor) else torch.full((batch, tokens), choice)

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

    def _run_layer(
        self,
        i: int,
        choice: StateChoice,
        x: torch.Tensor,
        rope: tuple,
        mask,
        positions,
        session: Session,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        """Layer i for every token of the step, each in its state; K/V of skipped tokens by the engine's rule."""
        bb, cache = self.backbone, session.cache
        if isinstance(choice, int) and choice == State.SKIP:
            return self._skip(i, x, rope, session, scale)
        if isinstance(choice, int) and bb.flat is not None:
            window = bb.windows[i]
            plain = session.key_valid is None and (window is None or cache.end <= window)
            return bb.flat[i](choice, x, rope, mask, cache, plain)
        skipped = None
        if isinstance(choice, int):
            bb.rows.set_uniform(choice)
        else:
            bb.rows.set_rows(choice)
            skipped = choice == State.SKIP
            if self.kv_rule is KVRule.COPY:
                cache.copy_rows = skipped
        try:
            out = bb.layers[i](x, attention_mask=mask, position_embeddings=rope, position_ids=positions, cache=cache)
        finally:
            cache.copy_rows = None
        return out if skipped is None else torch.where(skipped[..., None], x * scale, out)

    def _skip(
        self, i: int, x: torch.Tensor, rope: tuple, session: Session, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every token skips layer i: `scale * x` (default: the engine's scale), K/V by the engine's rule."""
        cache, flat = session.cache, self.backbone.flat
        if self.kv_rule is KVRule.COPY:
            cache.copy_from_below(i)
        elif flat is not None:
            flat[i].write_skipped_kv(x, rope, cache)
        else:
            cache.write(i, *self.backbone.project_kv(i, x, rope))
        return x * (self.scales[i] if scale is None else scale)

    def _run_sublayers(
        self, i: int, plan: SublayerSkip, x: torch.Tensor, rope: tuple, mask, positions, session: Session
    ) -> torch.Tensor:
        """Layer i with its planned sublayers skipped (a skipped one: its input times its scale), the rest in full.

        A skipped attention writes no K/V: the plan holds for every token of the session, so no query ever reads
        this layer's cache. The code mirrors the transformers layers' own forward for each family.
        """
        bb = self.backbone
        model_type = bb.config.model_type
        if model_type not in SUBLAYER_NORMS:
            raise DashskipError(
                f"sublayer skipping does not know the layer structure of '{model_type}'; it supports "
                f"{', '.join(sorted(SUBLAYER_NORMS))}"
            )
        layer = bb.layers[i]
        pre_attn, post_attn, pre_mlp, post_mlp = SUBLAYER_NORMS[model_type]
        bb.rows.set_uniform(int(State.FULL))
        if plan.attn is None:
            update, _ = layer.self_attn(
                hidden_states=getattr(layer, pre_attn)(x),
                position_embeddings=rope,
                attention_mask=mask,
                position_ids=positions,
                cache=session.cache,
            )
            mid = x + (update if post_attn is None else getattr(layer, post_attn)(update))
        else:
            mid = x * plan.attn
        if plan.mlp is not None:
            return mid * plan.mlp
        update = layer.mlp(getattr(layer, pre_mlp)(mid))
        return mid + (update if post_mlp is None else getattr(layer, post_mlp)(update))

    def _layers(
        self, x: torch.Tensor, decider: Decider, info: StepInfo, ropes, masks, positions, session: Session
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bb = self.backbone
        batch, tokens = x.shape[:2]
        decider.begin(info)
        states = torch.full((batch, tokens, bb.num_layers), int(State.FULL), dtype=torch.int8)
        previous: StateChoice = int(State.FULL)
        forced_full = {0} if decider.may_skip_last else {0, bb.num_layers - 1}
        scales = self.scales if decider.skip_scales is None else decider.skip_scales
        plan = decider.sublayers or {}
        try:
            for i in range(bb.num_layers):
                # Every layer is shown to the decider (an asynchronous policy decides layer i+1 while layer i
                # runs), but the first layer always runs in full whatever it answers, and so does the last unless
                # the decider exits early; a planned layer runs its kept sublayers in full.
                answer = decider(i, x, previous)
                choice = int(State.FULL) if i in forced_full or i in plan else self._normalize(answer, batch, tokens)
                rope, mask = ropes[bb.layer_types[i]], masks[bb.windows[i]]
                if i in plan:
                    x = self._run_sublayers(i, plan[i], x, rope, mask, positions, session)
                else:
                    x = self._run_layer(i, choice, x, rope, mask, positions, session, scales[i])
                states[:, :, i] = choice if isinstance(choice, int) else choice.to(torch.int8)
                previous = choice
        finally:
            bb.rows.set_uniform(int(State.FULL))
        return x, states

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,
        session: Session,
        decider: Decider | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> StepResult:
        """Run `input_ids` (batch, tokens) through every layer, appending their K/V to the session.

        `attention_mask` (batch, tokens), 1 for real tokens, 0 for padding, covers only the new tokens.
        """
        bb, cache = self.backbone, session.cache
        batch, tokens = input_ids.shape
        if tokens == 0:
            raise DashskipError("empty input: give at least one token")
        if attention_mask is not None:
            valid = attention_mask.bool()
            if session.key_valid is None and bool(valid.all()):
                valid = None
            elif session.key_valid is None:
                session.key_valid = torch.ones(batch, cache.length, dtype=torch.bool)
            if session.key_valid is not None:
                step_valid = valid if valid is not None else torch.ones(batch, tokens, dtype=torch.bool)
                session.key_valid = torch.cat([session.key_valid, step_valid], dim=1)
        elif session.key_valid is not None:
            session.key_valid = torch.cat([session.key_valid, torch.ones(batch, tokens, dtype=torch.bool)], dim=1)

        decider = decider or Decider()
        positions = self._positions(session, batch, tokens)
        cache.begin_step(tokens)
        x = bb.embed(input_ids)
        ropes = bb.rope(x, positions)
        masks = {
            w: build_mask(session.key_valid, cache.start, cache.end, w, batch, bb.attn_implementation)
            for w in set(bb.windows)
        }
        info = StepInfo(positions=positions, prefill=cache.start == 0, num_layers=bb.num_layers)
        run = (ropes, masks, positions, session)
        hidden, states = self._layers(x, decider, info, *run)
        # One check per step, not per layer: a skipped or quantized path that blew up is rare, and rerunning
        # the affected tokens in full (overwriting this step's K/V) is cheaper than checking 30 layers per token.
        bad = ~torch.isfinite(hidden).all(-1)
        if bool(bad.any()):
            self._warn_nonfinite(states[bad])
            hidden, states = self._layers(x, _FullFor(decider, bad), info, *run)
        cache.end_step()
        return StepResult(hidden, states)
