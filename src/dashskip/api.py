"""The public entry points: `from_pretrained`, `apply`, and the model object they return."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch

from dashskip.backbone import Backbone
from dashskip.calibration import Calibration
from dashskip.decisions import AtMost, Decider, FixedStates
from dashskip.engine import Engine
from dashskip.errors import DashskipError
from dashskip.generation import GenerateOutput, generate
from dashskip.loading import fingerprint, load_model
from dashskip.policy import DashPolicy
from dashskip.profiling import CostTable, default_profile_path
from dashskip.speculative import DraftLength, SpeculativeStats, generate_lossless
from dashskip.states import State

# Lossless drafters besides DASH: every inner layer in one quantized state.
QUANTIZED_DRAFTS = {"int8": int(State.INT8), "int4": int(State.INT4)}


def bundled_policy(name: str) -> Path | None:
    """The trained default policy shipped for an embedded alias, if there is one."""
    path = Path(str(resources.files("dashskip") / "policies" / f"{name}.safetensors"))
    return path if path.is_file() else None


class DashModel:
    """A transformers causal LM run by the dashskip engine; `generate` feels like transformers'."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        policy: DashPolicy | None = None,
        speedup: float = 1.0,
        calibration: Calibration | None = None,
        kv_rule: str | None = None,
        mode: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.backbone = Backbone(model)
        self.fingerprint = fingerprint(model)
        self.policy = policy
        self.mode = mode
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
        self.engine = Engine(self.backbone, scales, kv_rule or "project")
        self.costs = self._cost_table()
        self.decider: Decider = Decider()
        self.speedup = 1.0
        self.set_speedup(speedup)
        self.last_output: GenerateOutput | None = None
        self.last_speculative: SpeculativeStats | None = None

    def _cost_table(self) -> CostTable:
        if self.policy is not None:  # the table its operating points were calibrated with
            table = {int(k): float(v) for k, v in self.policy.meta["cost_table"].items()}
            return CostTable(table, table, bool(self.policy.meta.get("cost_table_measured")), self.fingerprint)
        profile = default_profile_path(self.fingerprint, str(self.engine.kv_rule))
        return CostTable.load(profile, self.fingerprint) if profile.exists() else CostTable.default()

    def set_speedup(self, speedup: float) -> None:
        """Move to another operating point (compute ratio); 1.0 runs every layer in full."""
        if not speedup >= 1.0:
            raise DashskipError(f"speedup must be >= 1.0 (1.0 = every layer in full), got {speedup}")
        if speedup > 1.0 and self.policy is None:
            raise DashskipError(
                f"speedup {speedup} needs a trained policy and none is loaded; pass policy=FILE "
                "(train one with `dashskip train`), or use speedup=1.0"
            )
        self.decider = self.policy.decider(speedup, self.mode) if speedup > 1.0 else Decider()
        self.speedup = float(speedup)

    @property
    def config(self) -> Any:
        return self.model.config

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
        lossless: bool = False,
        draft_tokens: int = 4,
        adaptive_draft: bool = True,
        draft: str = "dash",
    ) -> torch.Tensor | GenerateOutput:
        """Like transformers' `generate`; `return_dict_in_generate=True` adds per-token states and the compute ratio.

        `lossless=True`: a cheap path of the model drafts up to `draft_tokens` tokens, the full model verifies
        them; the output is the full model's (token-identical when greedy). Batch 1; statistics of the drafting
        land in `last_speculative`. `draft`: "dash" (the DASH path at the current speedup, its full-precision
        choices run in INT8), "int8" or "int4" (every inner layer in that state; on CPUs INT8 drafting is the
        fastest, docs/benchmarks.md).
        """
        gen_cfg = getattr(self.model, "generation_config", None)
        if eos_token_id is None and gen_cfg is not None:
            eos_token_id = gen_cfg.eos_token_id
        if pad_token_id is None and gen_cfg is not None:
            pad_token_id = gen_cfg.pad_token_id
        if not isinstance(input_ids, torch.Tensor):
            raise DashskipError(
                "input_ids must be a torch tensor of token ids (use the tokenizer with return_tensors='pt')"
            )
        if lossless:
            return self._generate_lossless(
                input_ids, max_new_tokens, do_sample, temperature, top_p, eos_token_id, streamer,
                return_dict_in_generate, generator, DraftLength(draft_tokens, adaptive_draft), draft,
            )  # fmt: skip
        out = generate(
            self.engine,
            input_ids,
            attention_mask,
            self.decider,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            streamer=streamer,
            costs=self.costs,
            generator=generator,
        )
        self.last_output = out
        return out if return_dict_in_generate else out.sequences

    def _generate_lossless(
        self, input_ids, max_new_tokens, do_sample, temperature, top_p, eos_token_id, streamer, as_dict, generator,
        length: DraftLength, draft: str,
    ) -> torch.Tensor | GenerateOutput:  # fmt: skip
        out, stats = generate_lossless(
            self.engine, input_ids, self._drafter(draft), max_new_tokens, do_sample, temperature, top_p,
            eos_token_id, streamer, generator, length,
        )  # fmt: skip
        self.last_output, self.last_speculative = out, stats
        return out if as_dict else out.sequences

    def _drafter(self, draft: str) -> Decider:
        """The decider lossless mode drafts with."""
        if draft in QUANTIZED_DRAFTS:
            n = self.backbone.num_layers
            return FixedStates([int(State.FULL)] + [QUANTIZED_DRAFTS[draft]] * (n - 2) + [int(State.FULL)])
        if draft != "dash":
            raise DashskipError(f"unknown drafter '{draft}'; choose dash, {', '.join(QUANTIZED_DRAFTS)}")
        if self.speedup <= 1.0:
            raise DashskipError(
                "lossless mode with draft='dash' drafts with the DASH path; set a speedup > 1 (e.g. speedup=2.0) "
                "to have one, or draft with 'int8'"
            )
        return AtMost(self.decider, int(State.INT8))  # drafts are verified: full precision buys them little


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
) -> DashModel:
    """Load a model (alias, folder or hub id) and wrap it in the dashskip engine.

    `speedup` > 1 needs a policy: the file given, or the default shipped for an embedded alias.
    """
    if not speedup >= 1.0:
        raise DashskipError(f"speedup must be >= 1.0 (1.0 = every layer in full), got {speedup}")
    chosen = _policy(policy, name_or_path, speedup)
    model, tokenizer = load_model(name_or_path, dtype=dtype)
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration.load(calibration)
    return DashModel(model, tokenizer, chosen, speedup, calibration, kv_rule, mode)


def apply(
    model: Any, policy: str | Path | DashPolicy | None = None, speedup: float = 1.0, tokenizer: Any = None
) -> DashModel:
    """Wrap a transformers model you already hold (its linears gain INT8/INT4 copies in place)."""
    model.eval()
    chosen = DashPolicy.load(policy) if policy is not None and not isinstance(policy, DashPolicy) else policy
    return DashModel(model, tokenizer, chosen, speedup)
