"""The public entry points: `from_pretrained`, `apply`, and the model object they return."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from dashskip.core import operating
from dashskip.core.costs import CostTable
from dashskip.core.decisions import AtMost, Decider, inner_layers
from dashskip.core.operating import OperatingPoint, Unit, check_number, resolve
from dashskip.core.states import State
from dashskip.errors import DashskipError
from dashskip.measure.calibration import Calibration
from dashskip.measure.profiling import default_profile_path
from dashskip.methods.context import MethodContext
from dashskip.methods.dash.policy import DashPolicy
from dashskip.models.backbone import Backbone
from dashskip.models.loading import fingerprint, load_model
from dashskip.runtime.engine import Engine, Session
from dashskip.runtime.generation import (
    DraftLength,
    GenerateOutput,
    GenerationConfig,
    SpeculativeStats,
    generate,
    generate_lossless,
)

# Lossless drafters besides DASH: every inner layer in one quantized state.
QUANTIZED_DRAFTS = {"int8": int(State.INT8), "int4": int(State.INT4)}


def bundled_policy(name: str) -> Path | None:
    """The trained default policy shipped for an embedded alias, if there is one."""
    path = Path(str(resources.files("dashskip") / "policies" / f"{name}.safetensors"))
    return path if path.is_file() else None


@dataclass
class DashOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output plus what dashskip ran: the states of every token at every layer and the
    compute ratio. `past_key_values` is the engine's `Session`: pass it back to continue the sequence."""

    states: torch.Tensor | None = None  # (batch, tokens, layers)
    compute_ratio: float | None = None


class DashModel:
    """A transformers causal LM run by the dashskip engine; `generate` and `__call__` feel like transformers'.

    The transformers model is read, never changed: it computes exactly what it computed before.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        policy: DashPolicy | None = None,
        speedup: float = 1.0,
        calibration: Calibration | None = None,
        kv_rule: str | None = None,
        mode: str | None = None,
        control: bool = True,
        wall_clock: bool = True,
        head: str = "full",
        kv_cache_dtype: str = "float32",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.backbone = Backbone(model)
        self.backbone.set_head(head)
        self.fingerprint = fingerprint(model)
        self.policy = policy
        self.mode = mode
        self.control = control  # DASH's rate control: each sequence steered to the ratio asked
        self.wall_clock = wall_clock  # a speedup is decode wall clock on this machine (else: a compute ratio)
        scales = None
        if calibration is not None:
            calibration.check(self.fingerprint)
            scales = calibration.scales
        if policy is not None:
            policy.check(self.fingerprint)
            scales = policy.scales()
            trained_rule = policy.meta["kv_rule"]
            if kv_rule is not None and kv_rule != trained_rule:
                raise DashskipError(
                    f"the policy was trained with the '{trained_rule}' K/V rule; inference must use the same "
                    f"(drop --kv-rule or pass '{trained_rule}')"
                )
            kv_rule = trained_rule
        self.engine = Engine(self.backbone, scales, kv_rule or "project", kv_cache_dtype)
        self.costs = self._cost_table()
        self.point = operating.full()
        self.decider: Decider = Decider()
        self.set_speedup(speedup)
        self.last_output: GenerateOutput | None = None
        self.last_speculative: SpeculativeStats | None = None

    def _cost_table(self) -> CostTable:
        if self.policy is not None and self.wall_clock:  # this machine's, knowing what decode costs beyond layers
            return self.policy.wall_clock_costs(self.engine, self.fingerprint, self.backbone.head_precision)
        if self.policy is not None:  # the table its operating points were calibrated with
            meta = self.policy.meta
            table = {int(k): float(v) for k, v in meta["cost_table"].items()}
            return CostTable(table, table, bool(meta.get("cost_table_measured")), self.fingerprint,
                             meta.get("cost_table_machine", ""))  # fmt: skip
        profile = default_profile_path(self.fingerprint, str(self.engine.kv_rule))
        return CostTable.load(profile, self.fingerprint) if profile.exists() else CostTable.default()

    def operating_point(self, speedup: float | OperatingPoint) -> OperatingPoint:
        """`speedup` checked and resolved on this machine, once: decode wall clock against the full path with the
        LM head set now (`wall_clock=False`: a compute ratio). Out of reach: one `DashskipError` naming the reach.
        A point already resolved for this head and unit is returned as it is; one resolved for another is resolved
        again from what it asked."""
        head = self.backbone.head_precision
        if isinstance(speedup, OperatingPoint):
            unit = Unit.SPEEDUP if self.wall_clock else Unit.RATIO
            if speedup.head == head and speedup.unit == unit and (speedup.full or self.policy is not None):
                return speedup
            speedup = speedup.asked  # resolved for another head or unit: what was asked, resolved here
        if self.policy is None:
            unit = Unit.SPEEDUP if self.wall_clock else Unit.RATIO
            return resolve(speedup, unit, None, self.costs, self.backbone.num_layers, head)
        return self.policy.operating_point(speedup, self._wall_clock_costs() if self.wall_clock else None, head)

    def decider_for(self, speedup: float | OperatingPoint, mode: str | None = None) -> Decider:
        """A new decider at an operating point (a number is resolved by `operating_point`); 1.0 runs every layer
        in full. Each request gets its own decider: it keeps the state of the sequences it decides for."""
        point = self.operating_point(speedup)
        if point.full:
            return Decider()
        costs = self._wall_clock_costs() if self.wall_clock else None
        return self.policy.decider(point, mode or self.mode, control=self.control, costs=costs,
                                   head=self.backbone.head_precision)  # fmt: skip

    def _wall_clock_costs(self) -> CostTable:
        """This machine's table, knowing what decode costs beyond the layers with the head set now."""
        head = self.backbone.head_precision
        if not self.costs.wall_clock(head, self.policy.decision_key):  # a head measured for the first time
            self.costs = self.policy.wall_clock_costs(self.engine, self.fingerprint, head)
        return self.costs

    def set_speedup(self, speedup: float | OperatingPoint) -> None:
        """Move the model's default operating point (what `generate` and `__call__` run without `speedup=`)."""
        point = self.operating_point(speedup)
        self.decider = self.decider_for(point)
        self.point = point

    @property
    def speedup(self) -> float:
        """The default operating point as it was asked (`point` has what it resolved to)."""
        return self.point.asked

    def set_head(self, precision: str) -> None:
        """Run the LM head in full, bf16 or INT8 (`Backbone.set_head`), and hold the operating point with it: a
        speedup is against the full path with the same head, and a cheaper head leaves the layers more to save."""
        self.backbone.set_head(precision)
        if self.policy is not None and self.wall_clock:
            self._wall_clock_costs()
        self.set_speedup(self.point.asked)  # resolved again: with this head the same speedup is another ratio

    @property
    def config(self) -> Any:
        return self.model.config

    def method_context(
        self, data_dir: str | Path | None = None, progress: bool = True, costs: CostTable | None = None
    ) -> MethodContext:
        """The model as `dashskip.methods.build` takes it; `costs`: another cost table than the model's own
        (methods compared at compute ratios on this host's table)."""
        return MethodContext(self.engine, self.tokenizer, self.model, self.fingerprint, costs or self.costs,
                             self.policy, data_dir, progress, self.wall_clock)  # fmt: skip

    def _pick(self, speedup: float | OperatingPoint | None, decider: Decider | None) -> Decider:
        if decider is not None:
            return decider
        return self.decider if speedup is None else self.decider_for(speedup)

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Session | None = None,
        use_cache: bool = True,
        speedup: float | None = None,
        decider: Decider | None = None,
        **_: Any,
    ) -> DashOutput:
        """A forward pass as transformers' causal LMs have it: logits for every position, each token with its own
        states. `past_key_values` (a `Session` from an earlier call) continues a sequence; `attention_mask`
        covers the new tokens (left padding). A new sequence is scored as a window (`Engine.score`): with rate
        control its rows are scored again until each runs at the operating point asked (within 1%)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise DashskipError("input_ids must be a (batch, tokens) tensor of token ids")
        if past_key_values is not None and not isinstance(past_key_values, Session):
            raise DashskipError("past_key_values must be the Session an earlier call of this model returned")
        chosen = self._pick(speedup, decider)
        if past_key_values is None:  # a new sequence: scored as a window, held at the operating point asked
            result = self.engine.score(input_ids, chosen, attention_mask)
            session = result.session
        else:
            session = past_key_values
            result = self.engine.step(input_ids, session, chosen, attention_mask)
        logits = self.backbone.logits(result.hidden)
        ratio = self.costs.compute_ratio(result.states, "prefill" if input_ids.shape[1] > 1 else "decode")
        return DashOutput(logits=logits, past_key_values=session if use_cache else None, states=result.states,
                          compute_ratio=ratio)  # fmt: skip

    forward = __call__

    def generation_config(self, **settings: Any) -> GenerationConfig:
        """The model's generation config (its EOS and pad ids) with `settings` applied."""
        gen = getattr(self.model, "generation_config", None)
        defaults = {
            "eos_token_id": getattr(gen, "eos_token_id", None),
            "pad_token_id": getattr(gen, "pad_token_id", None),
        }
        given = {k: v for k, v in settings.items() if v is not None or k not in defaults}
        return GenerationConfig.build(None, {**defaults, **given})

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Any = None,
        return_dict_in_generate: bool = False,
        generator: torch.Generator | None = None,
        speedup: float | None = None,
        decider: Decider | None = None,
        lossless: bool = False,
        draft_tokens: int = 4,
        adaptive_draft: bool = True,
        draft: str | None = None,
    ) -> torch.Tensor | GenerateOutput:
        """Like transformers' `generate`; `return_dict_in_generate=True` adds per-token states and the compute ratio.

        `speedup` runs this call at another operating point (the model's default stays); `decider` runs it with
        any decision function. `lossless=True`: a cheap path of the model drafts up to `draft_tokens` tokens, the
        full model verifies them; the output is the full model's (token-identical when greedy). Batch 1;
        statistics of the drafting land in `last_speculative`. `draft`: "dash" (the DASH path at the operating
        point, its full-precision choices run in INT8), "int8" or "int4" (every inner layer in that state; on CPUs
        INT8 drafting is the fastest, docs/benchmarks.md); default: dash where a DASH path runs, else int8.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise DashskipError(
                "input_ids must be a torch tensor of token ids (use the tokenizer with return_tensors='pt')"
            )
        config = self.generation_config(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )  # fmt: skip
        chosen = self._pick(speedup, decider)
        if lossless:
            out, stats = generate_lossless(
                self.engine, input_ids, self._drafter(draft, chosen), config, streamer=streamer, generator=generator,
                length=DraftLength(draft_tokens, adaptive_draft),
            )  # fmt: skip
            self.last_speculative = stats
        else:
            out = generate(self.engine, input_ids, attention_mask, chosen, config, streamer=streamer,
                           costs=self.costs, generator=generator)  # fmt: skip
        self.last_output = out
        return out if return_dict_in_generate else out.sequences

    def _drafter(self, draft: str | None, decider: Decider) -> Decider:
        """The decider lossless mode drafts with."""
        has_dash = type(decider) is not Decider
        draft = draft or ("dash" if has_dash else "int8")
        if draft in QUANTIZED_DRAFTS:
            return inner_layers(self.backbone.num_layers, QUANTIZED_DRAFTS[draft])
        if draft != "dash":
            raise DashskipError(f"unknown drafter '{draft}'; choose dash, {', '.join(QUANTIZED_DRAFTS)}")
        if not has_dash:
            raise DashskipError(
                "lossless mode with draft='dash' drafts with the DASH path; set a speedup > 1 (e.g. speedup=1.5) "
                "to have one, or draft with 'int8'"
            )
        return AtMost(decider, int(State.INT8))  # drafts are verified: full precision buys them little


def _policy(policy: str | Path | DashPolicy | None, name: str, speedup: float) -> DashPolicy | None:
    if isinstance(policy, DashPolicy):
        return policy
    if policy is not None:
        return DashPolicy.load(policy)
    if speedup > 1.0:
        default = bundled_policy(name)
        if default is None:
            raise DashskipError(
                f"no trained policy ships for '{name}'; train one (`dashskip train --model {name}`) and pass "
                "policy=FILE (--policy FILE)"
            )
        return DashPolicy.load(default)
    return None


def from_pretrained(
    name_or_path: str,
    speedup: float = 1.0,
    policy: str | Path | DashPolicy | None = None,
    calibration: str | Path | Calibration | None = None,
    kv_rule: str | None = None,
    mode: str | None = None,
    dtype: torch.dtype = torch.float32,
    control: bool = True,
    wall_clock: bool = True,
    head: str = "full",
    kv_cache_dtype: str = "float32",
) -> DashModel:
    """Load a model (alias, folder or hub id) and wrap it in the dashskip engine.

    `speedup` > 1 needs a policy: the file given, or the default shipped for an embedded alias. It is decode wall
    clock on this machine against the engine's full path with the same LM head (`head`: full, bf16 or int8), from
    this machine's cost table (measured once, announced); `wall_clock=False` takes it as the paper's compute ratio
    instead. `control` (on by default) steers every generated sequence to it; off runs the policy's calibrated
    bias as it is (the paper's fixed operating point, which moves with the text). `kv_cache_dtype`: float32, bfloat16
    or float16, what the K/V cache stores (16 bits: half the memory and the bytes each decode step reads).
    """
    chosen = _policy(policy, name_or_path, check_number(speedup))
    model, tokenizer = load_model(name_or_path, dtype=dtype)
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration.load(calibration)
    return DashModel(model, tokenizer, chosen, speedup, calibration, kv_rule, mode, control, wall_clock, head,
                     kv_cache_dtype)  # fmt: skip


def apply(
    model: Any, policy: str | Path | DashPolicy | None = None, speedup: float = 1.0, tokenizer: Any = None
) -> DashModel:
    """Wrap a transformers model you already hold; the model itself is not changed."""
    model.eval()
    chosen = DashPolicy.load(policy) if policy is not None and not isinstance(policy, DashPolicy) else policy
    return DashModel(model, tokenizer, chosen, speedup)
