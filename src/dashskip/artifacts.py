"""Trained artifacts (DASH policies, RL adapters): safetensors weights plus JSON metadata, written atomically.

One reader and one writer so every artifact fails the same clear way: missing, truncated, not ours, or from
another format version, each with the command that makes a new one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dashskip.errors import DashskipError
from dashskip.profiling import atomic_path


def save_artifact(path: str | Path, module: torch.nn.Module, meta: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, tmp, metadata={"dashskip": json.dumps(meta)})


def load_artifact(
    path: str | Path, kind: str, fmt: str, version: int, remedy: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a `fmt` file of `version`; `kind` names it and `remedy` says how to make a new one."""
    path = Path(path)
    if not path.is_file():
        raise DashskipError(f"{kind} file '{path}' not found; {remedy}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("dashskip")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DashskipError(f"{kind} file '{path}' is truncated or corrupt ({exc}); {remedy}") from None
    if raw is None:
        raise DashskipError(f"'{path}' is a safetensors file but not a dashskip {kind} (no metadata)")
    meta = json.loads(raw)
    if meta.get("format") != fmt or meta.get("version") != version:
        raise DashskipError(
            f"{kind} file '{path}' has format {meta.get('format')} version {meta.get('version')}; this dashskip "
            f"reads {fmt} version {version}: {remedy}"
        )
    return tensors, meta


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], kind: str, path: str | Path) -> None:
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:
        raise DashskipError(f"{kind} file '{path}' does not match its own config ({exc})") from None
    module.eval()
