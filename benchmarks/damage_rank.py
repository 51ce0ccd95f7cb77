"""Issue 31's diagnostic: how well does each scorer order a layer's tokens by the damage a lower precision does?

`damage_fit.py` found DASH's scoring model, fitted to measured damage, 12-26% perplexity behind dp-llm. This
measures the ranking directly, before any end-to-end run: on held-out windows, per inner layer l and lower state
s (INT8, INT4), the Spearman rank correlation across a layer's tokens between a scorer and two labels, the
layer's own output error in s on the input it got (`damage_fit.label`) and the KL of the final prediction from
the full model's with layer l in s (`damage_fit.label_kl`; every token of layer l at once, the others in full).
The scorers, each from layer l-1's input (asynchronous) except the first:
  - the measured output error itself (the local proxy, exact);
  - estimate: dp-llm's `||P (W_full - W_s) norm(x)||` (what `dp-llm` ranks by);
  - G: DASH's scoring model fitted to the local labels (`damage_fit.fit`, `relative` and `log` losses), alone and
    given the estimates as two more inputs (log of each over its layer's mean on the training windows);
  - G fitted to the KL labels (`log` loss) on windows of their own.
Everything is WikiText-2 *validation* text; training and held-out windows disjoint.

Usage: python benchmarks/damage_rank.py [--windows 24] [--kl-windows 8] [--heldout 4] [--losses relative,log]
Prints, per label and state, the mean and quartiles over layers of each scorer's rank correlation.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from damage_fit import LOWER, fit, label, label_kl, predict
from torch import nn
from torch.nn import functional as F

from dashskip.api import from_pretrained
from dashskip.core.decisions import Decider
from dashskip.core.states import State
from dashskip.methods.context import validation_windows
from dashskip.methods.dash.policy import PolicyConfig, ScoringModel
from dashskip.methods.dp_llm import Errors, projection
from dashskip.methods.quantized import sensitivity_for

FULL = int(State.FULL)
RANKED = (int(State.INT8), int(State.INT4))  # the lower states whose order within a layer is measured


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


def estimates(feats: torch.Tensor, current: torch.Tensor, errors: dict[int, Errors]) -> torch.Tensor:
    """(samples, len(RANKED)) dp-llm's estimate for layer current+1 from layer current's input."""
    out = torch.zeros(len(feats), len(RANKED))
    for layer in current.unique().tolist():
        rows = current == layer
        for k, state in enumerate(RANKED):
            out[rows, k] = errors[state](layer + 1, feats[rows])
    return out


def with_inputs(model: ScoringModel, extra: int) -> ScoringModel:
    """The scoring model with `extra` more inputs to its first layer."""
    first = model.mlp[0]
    model.mlp[0] = nn.Linear(first.in_features + extra, first.out_features)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=24, help="training windows of 256 tokens")
    parser.add_argument("--heldout", type=int, default=4, help="held-out windows the correlations are taken on")
    parser.add_argument("--kl-windows", type=int, default=8, help="training windows of end-to-end (KL) labels")
    parser.add_argument("--losses", default="relative,log", help="damage_fit.fit's losses to fit G with")
    args = parser.parse_args()
    torch.manual_seed(0)
    dm = from_pretrained(args.model, wall_clock=False)
    ctx = dm.method_context(progress=False)
    engine, n = ctx.engine, ctx.backbone.num_layers
    sensitivity = torch.stack([torch.tensor(sensitivity_for(ctx).delta_nll[s]).clamp(min=1e-6) for s in LOWER], 1)
    config = PolicyConfig(ctx.backbone.config.hidden_size, n, change_penalty=0.0, full_prior=0.0,
                          allowed=("int4", "int8", "full"))  # fmt: skip
    held_windows = validation_windows(ctx, args.heldout, 256, seed=14)
    train = label(ctx, validation_windows(ctx, args.windows, 256, seed=11), Decider(), sensitivity)
    held = label(ctx, held_windows, Decider(), sensitivity)
    train_kl = label_kl(ctx, validation_windows(ctx, args.kl_windows, 256, seed=15))
    held_kl = label_kl(ctx, held_windows)
    errors = {s: projection(engine)(s, FULL) for s in RANKED}
    est_train, est_held = (estimates(f, c, errors) for f, c, _ in (train, held))
    # the estimates as inputs: log of each over its layer's mean on the training windows (no held-out statistics)
    mean = torch.stack([(est_train[train[1] == c] ** 2).mean(0) for c in range(n)], 0).clamp(min=1e-30)  # (n, 2)

    def extra(est: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        return torch.log(est**2 / mean[current] + 1e-6)

    feats, current, local = held
    h = F.rms_norm(feats.float(), (feats.shape[-1],), eps=1e-6)
    index = {s: LOWER.index(s) for s in RANKED}
    scorers = {"local error (measured)": local, "estimate": torch.zeros_like(local)}
    for k, state in enumerate(RANKED):
        scorers["estimate"][:, index[state]] = est_held[:, k]
    fits = [(f"G ({loss}, local labels)", train, loss, inputs) for loss in args.losses.split(",")
            for inputs in (None, extra)]  # fmt: skip
    fits.append(("G (log, KL labels)", train_kl, "log", None))
    for name, labels, loss, inputs in fits:
        name = name if inputs is None else name.replace("G ", "G + estimate ")
        model = ScoringModel(config) if inputs is None else with_inputs(ScoringModel(config), len(RANKED))
        fit(model, *labels, sensitivity, loss, extra=None if inputs is None else inputs(est_train, labels[1]))
        with torch.no_grad():
            out = predict(model, h, current, None if inputs is None else inputs(est_held, current))
        scorers[name] = out if loss == "log" else -out  # higher: more damage
    tokens = int((current == current[0]).sum())
    for against, labels in (("the layer's output error", local), ("the KL of the final prediction", held_kl[2])):
        print(f"\nSpearman within each layer ({tokens} held-out tokens) against {against}:")
        for state in RANKED:
            for name, score in scorers.items():
                column = index[state]
                per_layer = [spearman(score[current == c, column], labels[current == c, column])
                             for c in current.unique().tolist()]  # fmt: skip
                q = statistics.quantiles(per_layer, n=4)
                spread = f"quartiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}  worst {min(per_layer):.3f}"
                print(f"{State(state).name:5s} {name:34s} mean {statistics.mean(per_layer):.3f}  {spread}", flush=True)


if __name__ == "__main__":
    main()
