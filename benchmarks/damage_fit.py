"""Ablation for issue 31: DASH's scoring model fitted to measured damage instead of trained by policy gradient.

Labels, per token and inner layer l and state s: the layer's own output error in s (`||f_s(x) - f_full(x)||^2`,
measured on the input x the layer actually got) as a share of its mean over the batch, times the layer's
end-to-end sensitivity to s (the static baselines' table): damage in NLL units, as `dp-llm` charges it, but
measured rather than estimated and for every state. The scoring model G(h_{l-1}, l-1, l) is fitted to -damage
(asynchronous: layer l decided from layer l-1's input), so greedy decisions are the state of least predicted
damage plus the cost bias; operating points are calibrated as `dashskip train` does, and rate control holds them.
Round 0 labels with every other layer in full; each further round labels with the layers as the last policy runs
them (at the middle target) and refits on all labels so far (DAgger). Everything is WikiText-2 *validation* text:
training, calibration and the dev windows scored here are disjoint; no test text is touched.

`--loss log` fits G to the log of each token's share of its layer's damage instead (the shares are heavy-tailed:
fitted as they are, G's order of a layer's tokens was no better than chance, `damage_rank.py`), and G then ranks
the tokens for dp-llm's budget spread (`dp_llm_for(..., estimator)`) in place of its random projection.
`--labels kl` labels with the KL of the final prediction instead of the layer's own output error (`label_kl`).

Usage: python benchmarks/damage_fit.py [--windows 24] [--rounds 2] [--states int4,int8,full]
       [--loss relative|absolute|log] [--labels local|kl] [--costs 0.060,0.228,0.331] [--dp-llm]
Prints the dev perplexity of each round at each target (and dp-llm's, with --dp-llm) and the full model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch
from torch.nn import functional as F

from dashskip.api import from_pretrained
from dashskip.core.costs import CostTable
from dashskip.core.decisions import Decider, FixedStates, Wrapper
from dashskip.core.losses import token_nll
from dashskip.core.states import State
from dashskip.measure.profiling import layer_runner
from dashskip.methods.context import MethodContext, validation_windows
from dashskip.methods.dash.policy import DashPolicy, PolicyConfig, ScoringModel
from dashskip.methods.dash.training import calibrate_operating_points
from dashskip.methods.dp_llm import Estimator, dp_llm_for
from dashskip.methods.quantized import sensitivity_for

LOWER = (int(State.SKIP), int(State.INT4), int(State.INT8))  # the scoring model's outputs before full's
TARGETS = (2.5, 2.75, 3.0)


class Capture(Wrapper):
    """The wrapped decider's answers; keeps every layer's input as the step ran it."""

    def __init__(self, decider: Decider) -> None:
        super().__init__(decider)
        self.hidden: dict[int, torch.Tensor] = {}

    def __call__(self, layer, hidden, previous):
        self.hidden[layer] = hidden.detach().clone()
        return self.decider(layer, hidden, previous)


@torch.no_grad()
def label(ctx: MethodContext, windows: torch.Tensor, decider: Decider, sensitivity: torch.Tensor):
    """(features (samples, d): layer l-1's input, current layer l-1 (samples,), damage (samples, 4))."""
    engine, n = ctx.engine, ctx.backbone.num_layers
    grab = Capture(decider)
    engine.step(windows, engine.new_session(*windows.shape), grab)
    feats, current, damage = [], [], []
    for layer in range(1, n - 1):
        run = layer_runner(engine, layer, grab.hidden[layer], engine.new_session(*windows.shape))
        full = run(int(State.FULL))
        error = torch.stack([((run(s) - full) ** 2).sum(-1).reshape(-1) for s in LOWER], 1)  # (tokens, 3)
        share = error / error.mean(0, keepdim=True).clamp(min=1e-30)
        damage.append(torch.cat([sensitivity[layer - 1][None] * share, torch.zeros(len(share), 1)], 1))
        feats.append(grab.hidden[layer - 1].reshape(len(share), -1))
        current.append(torch.full((len(share),), layer - 1))
    return torch.cat(feats), torch.cat(current), torch.cat(damage)


@torch.no_grad()
def label_kl(ctx: MethodContext, windows: torch.Tensor):
    """As `label`, with end-to-end labels: per token, the KL of the final prediction from the full model's when
    layer l runs in s (for every token of the window at once; the other layers in full), for INT4 and INT8 (skip
    is left at 0: the policies compared here never skip)."""
    engine, bb, n = ctx.engine, ctx.backbone, ctx.backbone.num_layers
    grab = Capture(Decider())
    full = engine.step(windows, engine.new_session(*windows.shape), grab)
    logp = F.log_softmax(bb.logits(full.hidden).float(), -1)
    p = logp.exp()
    feats, current, damage = [], [], []
    for layer in range(1, n - 1):
        columns = [torch.zeros(windows.numel())]
        for state in LOWER[1:]:
            states = [int(State.FULL)] * n
            states[layer] = state
            out = engine.step(windows, engine.new_session(*windows.shape), FixedStates(states))
            logq = F.log_softmax(bb.logits(out.hidden).float(), -1)
            columns.append((p * (logp - logq)).sum(-1).reshape(-1).clamp(min=0))
        damage.append(torch.stack([*columns, torch.zeros(windows.numel())], 1))
        feats.append(grab.hidden[layer - 1].reshape(windows.numel(), -1))
        current.append(torch.full((windows.numel(),), layer - 1))
    return torch.cat(feats), torch.cat(current), torch.cat(damage)


def predict(model: ScoringModel, h: torch.Tensor, current: torch.Tensor, extra: torch.Tensor | None = None):
    """The scoring model's outputs for layer current+1 from layer current's RMS-normed input `h` (and `extra`
    inputs, where the model was given more: `damage_rank.py`)."""
    emb = model.layer_embedding
    return model.mlp(torch.cat([h, emb(current), emb(current + 1), *([] if extra is None else [extra])], -1))


def fit(model: ScoringModel, feats, current, damage, sensitivity: torch.Tensor, loss: str, epochs: int = 8,
        extra: torch.Tensor | None = None) -> None:  # fmt: skip
    """Adam on -damage (in units of INT4's mean damage); `relative`: each state's error over its layer's mean;
    `log`: the log of that share for the lower states (the outputs are then log-shares, not scores: a ranking
    diagnostic, `damage_rank.py`)."""
    scale = 1.0 / float(sensitivity[:, 1].mean())
    target = -damage * scale
    unit = torch.cat([sensitivity, sensitivity[:, 2:3]], 1) * scale  # full as tight as INT8: all is relative to it
    if loss == "log":
        target = torch.log(damage[:, : len(LOWER)] / sensitivity[current] + 1e-4)
    h = F.rms_norm(feats.float(), (feats.shape[-1],), eps=1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = 2048
    steps = len(h) // batch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    for epoch in range(epochs):
        order, total = torch.randperm(len(h)), 0.0
        for b in range(steps):
            idx = order[b * batch : (b + 1) * batch]
            c = current[idx]
            out = predict(model, h[idx], c, None if extra is None else extra[idx])
            residual = (out[:, : len(LOWER)] if loss == "log" else out) - target[idx]
            if loss == "relative":
                residual = residual / unit[c]
            step_loss = F.smooth_l1_loss(residual, torch.zeros_like(residual))
            opt.zero_grad()
            step_loss.backward()
            opt.step()
            schedule.step()
            total += float(step_loss.detach())
        print(f"  epoch {epoch}: loss {total / steps:.4f}", flush=True)


def ranking(model: ScoringModel) -> Estimator:
    """G fitted with the `log` loss as dp-llm's estimator: a token's estimated error in `low` is
    exp(log-share / 2), so dp-llm's squared-error share is G's predicted share. G's shares are against full: for
    INT4 against INT8 (beyond INT8's reach) it ranks by INT4's share against full (INT8 is close to full)."""

    def for_pair(low: int, high: int):
        column = LOWER.index(low)

        @torch.no_grad()
        def errors(layer: int, hidden: torch.Tensor) -> torch.Tensor:
            x = hidden.reshape(-1, hidden.shape[-1]).float()
            h = F.rms_norm(x, (x.shape[-1],), eps=1e-6)
            c = torch.full((len(h),), layer - 1)
            return torch.exp(predict(model, h, c)[:, column] / 2).reshape(hidden.shape[:-1])

        return errors

    return for_pair


def dev_ppl(ctx: MethodContext, windows: torch.Tensor, decider: Decider | None) -> tuple[float, float, torch.Tensor]:
    """Perplexity, compute ratio and each window's mean NLL (for paired differences)."""
    result = ctx.engine.score(windows, decider)
    nll = token_nll(ctx.backbone.logits(result.hidden), windows).mean(-1)
    return math.exp(float(nll.mean())), ctx.costs.compute_ratio(result.states), nll


def paired(a: torch.Tensor, b: torch.Tensor) -> str:
    """Mean per-window NLL difference a - b and its standard error."""
    d = (a - b).double()
    return f"{float(d.mean()):+.4f} +- {float(d.std() / len(d) ** 0.5):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=24, help="training windows of 256 tokens")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--states", default="int4,int8,full", help="states the policy may choose")
    parser.add_argument(
        "--loss",
        choices=("relative", "absolute", "log"),
        default="relative",
        help="log: G ranks tokens (log-share of the error), dp-llm's budget sets thresholds",
    )
    parser.add_argument("--costs", default=None, help="skip,int4,int8 decode costs (default: this host's table)")
    parser.add_argument("--dp-llm", action="store_true", help="score dp-llm on the same dev windows")
    labels = "local: the layer's output error x its sensitivity; kl: the final prediction's KL (--rounds 1)"
    parser.add_argument("--labels", choices=("local", "kl"), default="local", help=labels)
    args = parser.parse_args()
    if args.labels == "kl" and args.rounds > 1:
        parser.error("--labels kl labels with every other layer in full: use --rounds 1")
    t0 = time.time()
    dm = from_pretrained(args.model, wall_clock=False)
    ctx = dm.method_context(progress=False)
    if args.costs:
        table = dict(zip(LOWER, map(float, args.costs.split(",")), strict=True)) | {int(State.FULL): 1.0}
        ctx = dataclasses.replace(ctx, costs=CostTable(table, table))
    engine, n = ctx.engine, ctx.backbone.num_layers
    sensitivity = torch.stack([torch.tensor(sensitivity_for(ctx).delta_nll[s]).clamp(min=1e-6) for s in LOWER], 1)
    config = PolicyConfig(ctx.backbone.config.hidden_size, n, change_penalty=0.0, full_prior=0.0,
                          allowed=tuple(args.states.split(",")))  # fmt: skip
    meta = {"fingerprint": ctx.fingerprint, "scales": engine.scales.tolist(), "kv_rule": str(engine.kv_rule),
            "cost_table": {str(k): v for k, v in ctx.costs.decode.items()}}  # fmt: skip
    train = validation_windows(ctx, args.windows, 256, seed=11)
    heldout = validation_windows(ctx, 8, 256, seed=12)
    dev = validation_windows(ctx, 16, 256, seed=13)
    print(f"costs {ctx.costs.decode}; full model dev ppl {dev_ppl(ctx, dev, None)[0]:.2f}", flush=True)
    if args.labels == "kl":
        feats, current, damage = label_kl(ctx, train)
    else:
        feats, current, damage = label(ctx, train, Decider(), sensitivity)
    scores: dict[tuple[int, float], torch.Tensor] = {}  # each round's per-window NLL at each target
    for round_ in range(args.rounds):
        model = ScoringModel(config)
        fit(model, feats, current, damage, sensitivity, args.loss)
        if args.loss == "log":  # G ranks each layer's tokens; dp-llm's budget spread sets the thresholds
            deciders = {target: dp_llm_for(ctx, target, ranking(model)) for target in TARGETS}
        else:  # G's scores are the decision, calibrated as `dashskip train` does
            policy = DashPolicy(model, dict(meta))
            calibrate_operating_points(policy, engine, heldout, TARGETS, ctx.costs, progress=False)
            deciders = {target: policy.decider(target) for target in TARGETS}
        for target in TARGETS:
            ppl, ratio, scores[(round_, target)] = dev_ppl(ctx, dev, deciders[target])
            print(f"round {round_} at {target}: dev ppl {ppl:.2f} (ratio {ratio:.3f}) [{time.time() - t0:.0f} s]",
                  flush=True)  # fmt: skip
        if round_ + 1 < args.rounds:  # on-policy: the layers as this policy runs them
            on_policy = deciders[TARGETS[1]] if args.loss == "log" else policy.decider(TARGETS[1], control=False)
            more = label(ctx, train, on_policy, sensitivity)
            feats, current, damage = (torch.cat([a, b]) for a, b in zip((feats, current, damage), more, strict=True))
    if args.dp_llm:
        for target in TARGETS:
            ppl, ratio, nll = dev_ppl(ctx, dev, dp_llm_for(ctx, target))
            versus = "; ".join(f"round {r} - dp-llm {paired(scores[(r, target)], nll)}" for r in range(args.rounds))
            print(f"dp-llm at {target}: dev ppl {ppl:.2f} (ratio {ratio:.3f}); NLL {versus}", flush=True)


if __name__ == "__main__":
    main()
