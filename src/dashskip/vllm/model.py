"""DASH model classes for vLLM: its own model with a state per token and layer, decided by a trained policy.

`DashLlamaForCausalLM` (and the Qwen2 and Mistral ones, by the same code) is vLLM's model class with another
forward. vLLM loads the weights, builds the layers (its parallel linear layers, its attention with the paged
K/V cache, its rotary tables) and samples; the forward runs, for every token of vLLM's flattened batch and every
layer, the state the policy chose for it (asynchronous mode: layer i+1 is decided from layer i's input):

- full: vLLM's own layer modules, so with every layer full the model computes exactly what vLLM's stock model
  computes (a layer whose tokens are all full is the stock layer call itself);
- INT8 / INT4: dashskip's handlers (`core.linear.Linear`) over the same weights, quantized once at load; the
  kernel is the one measured fastest on this host (`core.kernels`);
- skip: `scale_i * x`, and the 'project' K/V rule: the layer's own K/V projections of the token's input go
  into vLLM's paged cache through its attention call, so later tokens attend to it as to any other.

Tokens of one state are grouped per projection. Row-parallel projections (o, down) of our states are summed
over tensor-parallel ranks like vLLM's own; every rank decides the same states from the same replicated hidden
state. Each request runs at its own operating point (`requests.py`), steered by its own rate controller
(`methods/dash/control.py`) unless the model's configuration turns control off.

Configuration, through vLLM's `hf_overrides` (`dashskip serve --engine vllm` writes it):
`{"architectures": ["DashLlamaForCausalLM"], "dash_speedup": 1.67, "dash_policy": "/path.safetensors",
"dash_control": true, "dash_batch_states": "token"}`; without `dash_policy` the policy shipped for the model
folder's alias is used; `dash_batch_states: "majority"` runs one state per layer for the whole step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.sequence import IntermediateTensors

from dashskip.core.cache import KVRule
from dashskip.core.context import Rows, StateChoice
from dashskip.core.decisions import BatchMajority, Decider, FullFor, StepInfo, decide_and_run
from dashskip.core.linear import Linear
from dashskip.core.states import State, spec
from dashskip.errors import DashskipError
from dashskip.methods.dash.control import SequenceState
from dashskip.methods.dash.policy import DashPolicy, PolicyDecider, ScoredStep
from dashskip.models.loading import fingerprint_of
from dashskip.vllm import BATCH_STATES
from dashskip.vllm.requests import TABLE, Request, policy_file

log = logging.getLogger("vllm.dashskip")  # under vLLM's logger: its handlers and format
FULL = int(State.FULL)


@dataclass(frozen=True)
class DashSettings:
    """What the model's configuration asks of DASH: the policy file, the default operating point, rate control."""

    policy: Path
    speedup: float
    control: bool
    batch_states: str = "token"  # or "majority": per layer, every token of a step runs the state most chose

    @classmethod
    def read(cls, hf_config: Any, model_path: str) -> DashSettings:
        speedup = float(getattr(hf_config, "dash_speedup", 1.0))
        if not speedup >= 1.0:
            raise DashskipError(f"dash_speedup must be >= 1.0 (1.0 = every layer in full), got {speedup}")
        policy = policy_file(hf_config, model_path)
        if policy is None or not Path(policy).is_file():
            raise DashskipError(
                f"no DASH policy for {model_path}: pass one with hf_overrides {{\"dash_policy\": FILE}} "
                "(train one with `dashskip train`)" if policy is None else f"dash_policy {policy} is not a file"
            )
        batch_states = getattr(hf_config, "dash_batch_states", "token")
        if batch_states not in BATCH_STATES:
            raise DashskipError(f"dash_batch_states must be one of {', '.join(BATCH_STATES)}, got {batch_states!r}")
        return cls(Path(policy), speedup, bool(getattr(hf_config, "dash_control", True)), batch_states)


@dataclass
class LayerForms:
    """dashskip's projections over one vLLM decoder layer's weights (this rank's shard), for the non-full states
    and for a skipped token's K/V. Row-parallel ones carry no bias: it is added once, after the sum over ranks."""

    qkv: Linear
    kv: Linear
    o: Linear
    gate_up: Linear
    down: Linear

    @classmethod
    def of(cls, layer: torch.nn.Module) -> LayerForms:
        attn, mlp = layer.self_attn, layer.mlp
        weight, bias = attn.qkv_proj.weight, getattr(attn.qkv_proj, "bias", None)
        # vLLM's CPU linear layers drop their weight after packing it; these references keep it (docs/serving.md).
        kv = Linear([weight[attn.q_size :]], [None if bias is None else bias[attn.q_size :]])
        return cls(Linear([weight], [bias]), kv, Linear([attn.o_proj.weight]),
                   Linear([mlp.gate_up_proj.weight], [getattr(mlp.gate_up_proj, "bias", None)]),
                   Linear([mlp.down_proj.weight]))  # fmt: skip

    def make(self, states: Iterable[int]) -> None:
        """Quantize once, at load, for every state the policy may choose."""
        for linear in (self.qkv, self.o, self.gate_up, self.down):
            for state in states:
                linear.form(spec(state).handler)
        self.kv.form(spec(FULL).handler)


def _grouped(module: torch.nn.Module, linear: Linear, rows: Rows, x: torch.Tensor, row_parallel: bool) -> torch.Tensor:
    """A projection with each token in its state: full through vLLM's module, the others through `linear`
    (skipped tokens get zeros); a row-parallel one is summed over ranks like vLLM's."""
    if rows.uniform == FULL:
        return module(x)[0]
    out = x.new_zeros(x.shape[0], linear.out_features if not row_parallel else module.output_size)
    for state, index in rows.groups or ((rows.uniform, None),):
        if spec(state).skips:
            continue
        part = x if index is None else x[index]
        if state == FULL:
            result = module(part)[0]
        else:
            result = linear(state, part)
            if row_parallel:
                if get_tensor_model_parallel_world_size() > 1:
                    result = tensor_model_parallel_all_reduce(result)
                if getattr(module, "bias", None) is not None:
                    result = result + module.bias
        if index is None:
            return result
        out[index] = result
    return out


class DashRunner:
    """Runs the decoder layers of a vLLM model with per-token states, and keeps each request's accounting."""

    def __init__(self, model: Any, settings: DashSettings) -> None:
        self.model = model  # vLLM's inner model: embed, layers, norm
        self.settings = settings
        self.policy = DashPolicy.load(settings.policy)
        if self.policy.meta.get("kv_rule", "project") != str(KVRule.PROJECT):
            raise DashskipError("vLLM runs skipped tokens' K/V by the 'project' rule; this policy was trained "
                                f"with '{self.policy.meta['kv_rule']}'")  # fmt: skip
        if self.policy.config.num_layers != len(model.layers):
            raise DashskipError(f"the policy is for {self.policy.config.num_layers} layers, the model has "
                                f"{len(model.layers)}")  # fmt: skip
        self.num_layers = len(model.layers)
        self.scales = self.policy.scales()
        self.costs = self.policy.cost_table()
        self.default_bias = self.policy.bias_for(settings.speedup) if settings.speedup > 1.0 else 0.0
        # Its scorer, scales and mode; each step scores with a table of its own tokens' biases (`ScoredStep`).
        self.decider: PolicyDecider = self.policy.decider(settings.speedup, control=False)
        # Majority: a step never splits into state groups, so each projection reads one set of weights, which is
        # what pays at batch sizes where weight reads are shared (docs/serving.md); each request's controller then
        # steers what the batch ran.
        self.majority = settings.batch_states == "majority"
        self.forms: list[LayerForms] = []

    def after_loading(self) -> None:
        """Check the policy belongs to these weights and make the quantized forms, before vLLM packs them."""
        layers = self.model.layers
        if get_tensor_model_parallel_world_size() == 1:  # a shard's probes are not the model's
            cfg = self.model.config
            probe = fingerprint_of(cfg, self.model.embed_tokens.weight, layers[0].self_attn.qkv_proj.weight,
                                   layers[-1].mlp.down_proj.weight)  # fmt: skip
            self.policy.check(probe)
        cfg = self.policy.config
        states = [int(c) for n, c in zip(cfg.states, cfg.codes.tolist(), strict=True)
                  if n in cfg.allowed and not spec(int(c)).skips and c != FULL]  # fmt: skip
        self.forms = [LayerForms.of(layer) for layer in layers]
        for forms in self.forms:
            forms.make(states)
        log.info("dashskip: DASH policy %s on %d layers, default operating point %.2fx, rate control %s",
                 self.settings.policy.name, self.num_layers, self.settings.speedup,
                 "on" if self.settings.control else "off")  # fmt: skip

    # --- requests -----------------------------------------------------------------------------------------------

    def _target(self, request: Request) -> float:
        """The request's operating point, at most what the policy was calibrated for (warned)."""
        asked = request.speedup if request.speedup is not None else self.settings.speedup
        top = self.policy.max_speedup()
        if asked > top:
            log.warning("dashskip: a request asked for %.2fx, above the policy's calibrated range; it runs at %.2fx",
                        asked, top)  # fmt: skip
            return top
        return asked

    def _biases(
        self, spans: list[tuple[int, int, Request | None]], produces: list[bool], tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token: the cost bias of its request, and whether it must run every layer in full (1.0x). Each
        request's sequence begins its step here (`SequenceState.begin`: its bias, whether its chunk counts)."""
        bias = torch.full((tokens,), self.default_bias)
        full = torch.full((tokens,), self.settings.speedup <= 1.0)
        for (start, end, request), counts in zip(spans, produces, strict=True):
            if request is None:
                continue
            if request.sequence is None:  # first seen: its operating point, and its controller (steering or not)
                target = self._target(request)
                start_bias = self.policy.bias_for(target) if target > 1.0 else 0.0
                steer = self.settings.control and target > 1.0
                control = self.policy.rate_control(target, start_bias, self.costs, steer)
                control.reset(1)
                request.sequence = SequenceState(control)
            # one row; started over when first seen (a preempted request resumes its count, so never here)
            step = StepInfo(torch.zeros(1, 1, dtype=torch.long), prefill=False, num_layers=self.num_layers,
                            produces=counts)  # fmt: skip
            row_bias = request.sequence.begin(step)
            if request.control.target <= 1.0:
                full[start:end] = True
                continue
            full[start:end] = False
            bias[start:end] = float(row_bias[0])
        return bias, full

    def _spans(self, tokens: int) -> tuple[list[tuple[int, int, Request | None]], list[bool]]:
        """Each request's tokens in the flattened batch (vLLM's order is the persistent batch's), and whether
        its chunk produces a token (the prompt is complete by its end). Empty for vLLM's dummy runs."""
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict) or not metadata:
            return [], []
        first = next(iter(metadata.values()))
        starts, lengths = getattr(first, "query_start_loc", None), getattr(first, "seq_lens", None)
        if starts is None or lengths is None:
            return [], []
        starts, lengths = starts.tolist(), lengths.tolist()
        spans, produces = [], []
        for b in range(len(starts) - 1):
            request = TABLE.slots.get(b)
            spans.append((starts[b], min(starts[b + 1], tokens), request))
            produces.append(request is not None and request.produces(lengths[b]))
        return spans, produces

    def _account(self, spans: list[tuple[int, int, Request | None]], states: torch.Tensor) -> None:
        """Each request's sequence ends its step: the token its chunk produced, if it produced one, is counted."""
        for start, end, request in spans:
            if request is not None and end > start:
                request.sequence.end(states[end - 1 : end][None])  # (1, 1, layers): the chunk's last token

    # --- the layers ---------------------------------------------------------------------------------------------

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder layers from the embedded tokens: (hidden, residual) as vLLM's final norm takes them."""
        tokens = hidden.shape[0]
        spans, produces = self._spans(tokens)
        bias, full = self._biases(spans, produces, tokens)
        layers = self.model.layers
        if bool(full.all()):  # every token at 1.0x: vLLM's stock layers
            residual = None
            for layer in layers:
                hidden, residual = layer(positions, hidden, residual)
            states = torch.full((tokens, self.num_layers), FULL, dtype=torch.int8)
            self._account(spans, states)
            return hidden, residual
        decider: Decider = ScoredStep(self.decider, self.decider.greedy.table(bias))  # a bias per token
        if self.majority:
            decider = BatchMajority(decider, ~full[:, None])
        if bool(full.any()):  # requests at 1.0x: every layer in full, and no vote in the majority
            decider = FullFor(decider, full[:, None])

        def run(i: int, choice: StateChoice, x: torch.Tensor) -> torch.Tensor:  # vLLM's tokens as rows of one
            rows = Rows.of(choice.reshape(-1) if isinstance(choice, torch.Tensor) else choice)
            return self._layer(i, layers[i], rows, x[:, 0], positions)[:, None]

        x, states = decide_and_run(hidden[:, None], decider, self.num_layers, run)
        x, states = x[:, 0], states[:, 0]
        self._account(spans, states)
        return x, None

    def _layer(self, i: int, layer: Any, rows: Rows, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if rows.uniform == FULL:
            out, residual = layer(positions, x, None)
            return out + residual
        attn, mlp, forms = layer.self_attn, layer.mlp, self.forms[i]
        skipped = rows.skipped() if rows.uniform is None else torch.full((x.shape[0],), spec(rows.uniform).skips)
        normed = layer.input_layernorm(x)
        qkv = _grouped(attn.qkv_proj, forms.qkv, rows, normed, row_parallel=False)
        if bool(skipped.any()):  # 'project': a skipped token's own K/V, in full precision
            index = torch.nonzero(skipped).squeeze(1)
            qkv[index, attn.q_size :] = forms.kv(FULL, normed[index])
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        attended = attn.attn(q, k, v)
        if bool(skipped.all()):
            return x * self.scales[i]
        mid = x + _grouped(attn.o_proj, forms.o, rows, attended, row_parallel=True)
        gate_up = _grouped(mlp.gate_up_proj, forms.gate_up, rows, layer.post_attention_layernorm(mid), False)
        out = mid + _grouped(mlp.down_proj, forms.down, rows, mlp.act_fn(gate_up), row_parallel=True)
        return torch.where(skipped[:, None], x * self.scales[i], out)


def _refuse_unsupported(vllm_config: VllmConfig) -> None:
    """What the per-token forward does not run, refused in one line rather than computed wrongly."""
    model_config, hf = vllm_config.model_config, vllm_config.model_config.hf_config
    problems = {
        "pipeline parallelism (tensor parallelism works; drop --pipeline-parallel-size)": get_pp_group().world_size > 1,
        f"dtype {model_config.dtype} (policies are trained on the fp32 weights; pass --dtype float32)":
            model_config.dtype != torch.float32,
        "LoRA adapters (drop --enable-lora)": vllm_config.lora_config is not None,
        "quantized checkpoints (DASH makes its own INT8/INT4 forms; serve the fp32 weights)":
            vllm_config.quant_config is not None,
        "weights that are not loaded (--load-format dummy)": vllm_config.load_config.load_format == "dummy",
        "q/k norms (Qwen2 qk_norm)": bool(getattr(hf, "qk_norm", False)),
        "Mistral's llama_4_scaling / ada_rms_norm_t_cond": bool(getattr(hf, "llama_4_scaling", None))
        or bool(getattr(hf, "ada_rms_norm_t_cond", False)),
    }  # fmt: skip
    found = [name for name, present in problems.items() if present]
    if found:
        raise DashskipError("DASH in vLLM does not run " + "; ".join(found))


class DashMixin:
    """vLLM's causal LM with DASH's forward; everything else (loading, logits, sampling) is vLLM's."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        model_config = vllm_config.model_config
        _refuse_unsupported(vllm_config)
        self.dash = DashRunner(self.model, DashSettings.read(model_config.hf_config, model_config.model))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        self.dash.after_loading()
        return loaded

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.model.embed_input_ids(input_ids)
        hidden, residual = self.dash.forward(hidden, positions)
        return self.model.norm(hidden) if residual is None else self.model.norm(hidden, residual)[0]


class DashLlamaForCausalLM(DashMixin, LlamaForCausalLM):
    pass


class DashQwen2ForCausalLM(DashMixin, Qwen2ForCausalLM):
    pass


class DashMistralForCausalLM(DashMixin, MistralForCausalLM):
    pass
