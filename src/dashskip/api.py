"""The public entry points: `from_pretrained`, `apply`, and the model object they return."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dashskip.backbone import Backbone
from dashskip.calibration import Calibration
from dashskip.decisions import Decider
from dashskip.engine import Engine
from dashskip.errors import DashskipError
from dashskip.generation import GenerateOutput, generate
from dashskip.loading import fingerprint, load_model
from dashskip.profiling import CostTable, default_profile_path


class DashModel:
    """A transformers causal LM run by the dashskip engine; `generate` feels like transformers'."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        speedup: float = 1.0,
        calibration: Calibration | None = None,
        kv_rule: str = "copy",
        decider: Decider | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.backbone = Backbone(model)
        self.fingerprint = fingerprint(model)
        if calibration is not None:
            calibration.check(self.fingerprint)
        self.calibration = calibration
        self.engine = Engine(self.backbone, calibration.scales if calibration else None, kv_rule)
        profile = default_profile_path(self.fingerprint)
        self.costs = CostTable.load(profile, self.fingerprint) if profile.exists() else CostTable.default()
        self.decider = decider or Decider()
        self.speedup = self._check_speedup(speedup)
        self.last_output: GenerateOutput | None = None

    def _check_speedup(self, speedup: float) -> float:
        if not speedup >= 1.0:
            raise DashskipError(f"speedup must be >= 1.0 (1.0 = every layer in full), got {speedup}")
        if speedup > 1.0 and type(self.decider) is Decider:
            raise DashskipError(
                f"speedup {speedup} needs a decision policy; none is loaded (pass decider=..., "
                "or use speedup=1.0 for the full model)"
            )
        return float(speedup)

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
    ) -> torch.Tensor | GenerateOutput:
        """Like transformers' `generate`; `return_dict_in_generate=True` adds per-token states and the compute ratio."""
        gen_cfg = getattr(self.model, "generation_config", None)
        if eos_token_id is None and gen_cfg is not None:
            eos_token_id = gen_cfg.eos_token_id
        if pad_token_id is None and gen_cfg is not None:
            pad_token_id = gen_cfg.pad_token_id
        if not isinstance(input_ids, torch.Tensor):
            raise DashskipError(
                "input_ids must be a torch tensor of token ids (use the tokenizer with return_tensors='pt')"
            )
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


def from_pretrained(
    name_or_path: str,
    speedup: float = 1.0,
    calibration: str | Path | Calibration | None = None,
    kv_rule: str = "copy",
    decider: Decider | None = None,
    dtype: torch.dtype = torch.float32,
) -> DashModel:
    """Load a model (alias, folder or hub id) and wrap it in the dashskip engine."""
    model, tokenizer = load_model(name_or_path, dtype=dtype)
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration.load(calibration)
    return DashModel(model, tokenizer, speedup, calibration, kv_rule, decider)


def apply(
    model: Any, calibration: Calibration | None = None, kv_rule: str = "copy", tokenizer: Any = None
) -> DashModel:
    """Wrap a transformers model you already hold (its linears gain INT8/INT4 copies in place)."""
    model.eval()
    return DashModel(model, tokenizer, 1.0, calibration, kv_rule)
