"""Everything dashskip writes to disk goes through here: the cache folder, atomic writes, trained artifacts.

Writes are atomic (a temp file renamed over the target), so a crash never leaves half a file: a checkpoint, a
cost table or a policy is either the old one or the new one. Trained artifacts (DASH policies, RL adapters) are
safetensors weights plus JSON metadata with one reader and one writer, so every artifact fails the same clear
way: missing, truncated, not ours, or from another format version, each with the command that makes a new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dashskip.errors import DashskipError


def cache_dir() -> Path:
    """Root of everything dashskip caches (models, profiles, kernels); `DASHSKIP_CACHE` overrides it."""
    root = os.environ.get("DASHSKIP_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dashskip"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside `path`, renamed over it once the write finished: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        torch.save(obj, tmp)


def save_artifact(path: str | Path, module: torch.nn.Module, meta: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, tmp, metadata={"dashskip": json.dumps(meta)})


def load_artifact(
    path: str | Path, kind: str, fmt: str, version: int | tuple[int, ...], remedy: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a `fmt` file of `version` (or one of several the reader converts); `kind` names it and
    `remedy` says how to make a new one."""
    versions = version if isinstance(version, tuple) else (version,)
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
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise DashskipError(f"{kind} file '{path}' has unreadable metadata ({exc}); {remedy}") from None
    if not isinstance(meta, dict):
        raise DashskipError(f"{kind} file '{path}' has metadata that is not a JSON object; {remedy}")
    if meta.get("format") != fmt or meta.get("version") not in versions:
        raise DashskipError(
            f"{kind} file '{path}' has format {meta.get('format')} version {meta.get('version')}; this dashskip "
            f"reads {fmt} version {' or '.join(map(str, versions))}: {remedy}"
        )
    return tensors, meta


def require(meta: dict[str, Any], keys: tuple[str, ...], kind: str, path: str | Path, remedy: str) -> None:
    """A one-line error naming the file and the first of `keys` its metadata lacks."""
    missing = [k for k in keys if k not in meta]
    if missing:
        raise DashskipError(f"{kind} file '{path}' lacks '{missing[0]}' in its metadata; {remedy}")


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], kind: str, path: str | Path) -> None:
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:  # torch lists every mismatch on lines of their own: the first says enough
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc).strip())
        raise DashskipError(f"{kind} file '{path}' does not match its own config ({first}); retrain it") from None
    module.eval()


def truncate_log(path: Path, step: int) -> None:
    """Drop JSONL log lines past the checkpoint a run resumes from, so the log matches an uninterrupted run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
