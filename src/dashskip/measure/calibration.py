"""Calibration (paper eq. 7): per-layer skip scales and input/output similarity.

scale_i is the mean over calibration tokens of ||Y_i|| / ||X_i||, so a skipped
layer outputs scale_i * X_i. Cosine similarities of the whole layer and of its
attention and MLP sublayers say which layers are redundant (the static and
AdaSkip baselines use them). Measured on the unmodified transformers model
with forward hooks, so nothing of dashskip's engine can bias it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from dashskip.core.files import atomic_write_text
from dashskip.errors import DashskipError
from dashskip.models import family_for

FORMAT_VERSION = 1


def scales_key(scales: torch.Tensor) -> list[float]:
    """Skip scales as plain rounded numbers: what caches record of the scales their results were computed with."""
    return [round(float(s), 6) for s in scales]


@dataclass
class Calibration:
    """Per-layer statistics; lists are indexed by layer."""

    scales: list[float]
    cosine: list[float]
    attn_cosine: list[float]
    attn_scale: list[float]
    mlp_cosine: list[float]
    mlp_scale: list[float]
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.scales)

    def check(self, fingerprint: str) -> None:
        if self.fingerprint != fingerprint:
            raise DashskipError(
                f"calibration was computed on another model (fingerprint {self.fingerprint}, "
                f"this model {fingerprint}); run `dashskip calibrate` for this model"
            )

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps({"version": FORMAT_VERSION, **asdict(self)}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text())
            if data.pop("version", None) != FORMAT_VERSION:
                raise ValueError(f"unsupported format version (this dashskip reads version {FORMAT_VERSION})")
            return cls(**data)
        except FileNotFoundError:
            raise DashskipError(f"calibration file '{path}' not found; create it with `dashskip calibrate`") from None
        except (OSError, ValueError, TypeError) as exc:
            raise DashskipError(
                f"calibration file '{path}' is unreadable ({exc}); re-run `dashskip calibrate`"
            ) from None

    def plot(self, path: str | Path, title: str = "") -> None:
        """Cosine similarity and scale per layer (the paper's figure 1, left)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = list(range(self.num_layers))
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(layers, self.cosine, "o-", label="cos(input, output) of layer")
        ax.plot(layers, self.attn_cosine, ".--", alpha=0.6, label="attention sublayer")
        ax.plot(layers, self.mlp_cosine, ".--", alpha=0.6, label="MLP sublayer")
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine similarity")
        ax.set_ylim(min(0.0, min(self.cosine)), 1.02)
        right = ax.twinx()
        right.plot(layers, self.scales, "s-", color="tab:red", label="scale ||Y||/||X||")
        right.set_ylabel("scale (log)", color="tab:red")
        right.set_yscale("log")  # layer 0 often scales by >10x and would flatten the rest
        lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
        ax.legend(lines, labels, loc="lower center", fontsize=8)
        ax.set_title(title or f"calibration ({self.meta.get('model', '')})")
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _cos_and_ratio(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cosine(a, b) and ||b|| / ||a||, summed over tokens."""
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    cos = F.cosine_similarity(a, b, dim=-1)
    ratio = b.norm(dim=-1) / a.norm(dim=-1).clamp(min=1e-12)
    return cos.sum(), ratio.sum()


@torch.no_grad()
def calibrate(
    model: Any,
    samples: torch.Tensor,
    fingerprint: str,
    batch_size: int = 4,
    progress: bool = True,
    meta: dict | None = None,
) -> Calibration:
    """Run the model in full over `samples` (N, T) and average the per-token statistics."""
    layers, mid_residual = model.model.layers, family_for(model.config).mid_residual
    n = len(layers)
    sums = torch.zeros(6, n, dtype=torch.float64)  # layer cos, layer ratio, attn cos, attn ratio, mlp cos, mlp ratio
    captured: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(n)}
    hooks = []

    def layer_pre(i):
        def hook(module, args, kwargs):
            captured[i]["x"] = args[0] if args else kwargs["hidden_states"]

        return hook

    def mid_pre(i):
        def hook(module, args):
            captured[i]["m"] = args[0]

        return hook

    def layer_post(i):
        def hook(module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output
            x, m = captured[i]["x"], captured[i]["m"]
            for row, (a, b) in enumerate(((x, y), (x, m), (m, y))):
                cos, ratio = _cos_and_ratio(a, b)
                sums[2 * row, i] += cos
                sums[2 * row + 1, i] += ratio

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
        hooks.append(getattr(layer, mid_residual).register_forward_pre_hook(mid_pre(i)))
        hooks.append(layer.register_forward_hook(layer_post(i), with_kwargs=True))
    tokens = 0
    try:
        for start in tqdm(range(0, samples.shape[0], batch_size), desc="calibrating", disable=not progress):
            batch = samples[start : start + batch_size]
            model(input_ids=batch, use_cache=False)
            tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    means = (sums / tokens).tolist()
    meta = {**(meta or {}), "tokens": tokens, "samples": int(samples.shape[0]), "seq_len": int(samples.shape[1])}
    return Calibration(
        scales=means[1],
        cosine=means[0],
        attn_cosine=means[2],
        attn_scale=means[3],
        mlp_cosine=means[4],
        mlp_scale=means[5],
        fingerprint=fingerprint,
        meta=meta,
    )
