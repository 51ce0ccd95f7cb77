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

Usage: python benchmarks/damage_fit.py [--windows 24] [--rounds 2] [--states int4,int8,full] [--loss relative]
       [--costs 0.060,0.228,0.331] [--dp-llm]
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
from dashskip.core.decisions import Decider, Wrapper
from dashskip.core.losses import token_nll
from dashskip.core.states import State
from dashskip.measure.profiling import layer_runner
from dashskip.methods.context import MethodContext, validation_windows
from dashskip.methods.dash.policy import DashPolicy, PolicyConfig, ScoringModel
from dashskip.methods.dash.training import calibrate_operating_points
from dashskip.methods.dp_llm import dp_llm_for
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


def fit(model: ScoringModel, feats, current, damage, sensitivity: torch.Tensor, loss: str, epochs: int = 8) -> None:
    """Adam on -damage (in units of INT4's mean damage); `relative`: each state's error over its layer's mean."""
    scale = 1.0 / float(sensitivity[:, 1].mean())
    target = -damage * scale
    unit = torch.cat([sensitivity, sensitivity[:, 2:3]], 1) * scale  # full as tight as INT8: all is relative to it
    h = F.rms_norm(feats.float(), (feats.shape[-1],), eps=1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = 2048
    steps = len(h) // batch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    emb = model.layer_embedding
    for epoch in range(epochs):
        order, total = torch.randperm(len(h)), 0.0
        for b in range(steps):
            idx = order[b * batch : (b + 1) * batch]
            c = current[idx]
            out = model.mlp(torch.cat([h[idx], emb(c), emb(c + 1)], -1))
            residual = out - target[idx]
            if loss == "relative":
                residual = residual / unit[c]
            step_loss = F.smooth_l1_loss(residual, torch.zeros_like(residual))
            opt.zero_grad()
            step_loss.backward()
            opt.step()
            schedule.step()
            total += float(step_loss.detach())
        print(f"  epoch {epoch}: loss {total / steps:.4f}", flush=True)


def dev_ppl(ctx: MethodContext, windows: torch.Tensor, decider: Decider | None) -> tuple[float, float]:
    result = ctx.engine.score(windows, decider)
    nll = token_nll(ctx.backbone.logits(result.hidden), windows).mean()
    return math.exp(float(nll)), ctx.costs.compute_ratio(result.states)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=24, help="training windows of 256 tokens")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--states", default="int4,int8,full", help="states the policy may choose")
    parser.add_argument("--loss", choices=("relative", "absolute"), default="relative")
    parser.add_argument("--costs", default=None, help="skip,int4,int8 decode costs (default: this host's table)")
    parser.add_argument("--dp-llm", action="store_true", help="score dp-llm on the same dev windows")
    args = parser.parse_args()
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
    feats, current, damage = label(ctx, train, Decider(), sensitivity)
    for round_ in range(args.rounds):
        model = ScoringModel(config)
        fit(model, feats, current, damage, sensitivity, args.loss)
        policy = DashPolicy(model, dict(meta))
        calibrate_operating_points(policy, engine, heldout, TARGETS, ctx.costs, progress=False)
        for target in TARGETS:
            ppl, ratio = dev_ppl(ctx, dev, policy.decider(target))
            print(f"round {round_} at {target}: dev ppl {ppl:.2f} (ratio {ratio:.3f}) [{time.time() - t0:.0f} s]",
                  flush=True)  # fmt: skip
        if round_ + 1 < args.rounds:  # on-policy: the layers as this policy runs them
            more = label(ctx, train, policy.decider(TARGETS[1], control=False), sensitivity)
            feats, current, damage = (torch.cat([a, b]) for a, b in zip((feats, current, damage), more, strict=True))
    if args.dp_llm:
        for target in TARGETS:
            ppl, ratio = dev_ppl(ctx, dev, dp_llm_for(ctx, target))
            print(f"dp-llm at {target}: dev ppl {ppl:.2f} (ratio {ratio:.3f})", flush=True)


if __name__ == "__main__":
    main()
