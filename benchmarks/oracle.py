"""An upper bound on what choosing states per token can gain over the best static schedule (issue 22, item 4).

Scores the same WikiText-2 test windows under a ladder of static per-layer schedules (the sensitivity-greedy
`int8`, `mixed` and `mixed-skip` baselines at compute ratios from 1.05 up to as fast as each goes), then lets
hindsight oracles pick at each compute ratio: one schedule for all windows, one per window, one per token, each
chosen by the NLL it gets (label hindsight: includes luck) and by how little it moves the full model's
predictions (fidelity hindsight: KL divergence, the bound that matters; `dashskip.eval.oracle` says what each
assumes). A DASH policy, given, runs at the same ratios for comparison. Every difference is paired over the same
windows (mean NLL, ± SE), to the full model and to the best static schedule at that ratio (chosen by NLL on these
windows: the static frontier at its strongest).

The axis is the compute ratio (full layers per token over executed ones, this machine's cost table): what a
policy controls. The decode speedup it gives depends on the head and the rest of a step (`dashskip bench`).

Usage: python benchmarks/oracle.py --model smollm2-135m [--policy P.safetensors] [--targets 1.33 1.67 2 2.5 3]
       [--limit 40] [--out oracle.json] [--plot oracle.png] [--scores ladder.safetensors]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path

import torch

from dashskip.api import from_pretrained
from dashskip.core.kernels import host_description
from dashskip.data import load_text
from dashskip.errors import DashskipError
from dashskip.eval.evaluation import perplexity, perplexity_windows
from dashskip.eval.oracle import GRANULARITIES, kept_ladder_scores, oracle, schedule_ladder
from dashskip.eval.plots import perplexity_lines
from dashskip.eval.tasks import paired_difference
from dashskip.methods.dash.policy import DashPolicy
from dashskip.methods.quantized import QUANT_METHODS, sensitivity_for

STATIC = ("int8", "mixed", "mixed-skip")
CRITERIA = {"label": False, "fidelity": True}  # hindsight on the NLL itself, or on the KL from the full model


def dash_row(dm, policy: DashPolicy, windows: torch.Tensor, target: float) -> dict:
    """The policy at compute ratio `target` (rate control on), per-window NLL and the ratio it ran at."""
    result = perplexity(dm.engine, windows, policy.decider(target), dm.costs, progress=False)
    return {"name": "dash", "target": target, "ratio": result.compute_ratio, "nlls": result.window_nlls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", type=Path, help="a DASH policy to run at the same compute ratios")
    parser.add_argument("--targets", type=float, nargs="+", default=[1.33, 1.67, 2.0, 2.5, 3.0])
    parser.add_argument("--limit", type=int, default=40, help="WikiText-2 test windows of 256 tokens")
    parser.add_argument("--step", type=float, default=0.1, help="compute-ratio spacing of the schedule ladder")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--scores", type=Path, help="keep the ladder's scores here and reuse them (.safetensors)")
    args = parser.parse_args()
    dm = from_pretrained(args.model, wall_clock=False)
    n = dm.backbone.num_layers
    windows = perplexity_windows(dm.tokenizer, load_text("wikitext2"), 256, args.limit)
    sensitivity = sensitivity_for(dm.method_context())
    grid = sorted({round(1.05 + args.step * i, 3) for i in range(int(3.5 / args.step))} | set(args.targets))
    ladder = schedule_ladder(sensitivity, dm.costs, {m: QUANT_METHODS[m] for m in STATIC}, grid)
    cost = dm.costs.token_costs(torch.tensor(ladder)).double()
    print(f"{len(ladder)} static schedules, compute ratios {n / float(cost.max()):.2f} to {n / float(cost.min()):.2f};"
          f" scoring {windows.shape[0]} windows under each", flush=True)  # fmt: skip
    nll, kl = kept_ladder_scores(dm.engine, windows, ladder, args.scores, dm.fingerprint, progress=True)
    full = nll[0].mean(-1).tolist()
    rows: list[dict] = []
    for target in args.targets:
        per_target = []
        for (hindsight, criterion), granularity in itertools.product(CRITERIA.items(), GRANULARITIES):
            if hindsight == "fidelity" and granularity == "schedule":
                continue  # one schedule for all: the label choice averages over every token, luck and all
            try:
                found = oracle(nll, cost, n, target, granularity, criterion=kl if criterion else None)
            except DashskipError as exc:
                print(f"{granularity} oracle at {target}: {exc}", flush=True)
                continue
            name = "best static schedule" if granularity == "schedule" else f"oracle per {granularity}, {hindsight}"
            per_target.append({"name": name, "target": target, "ratio": found.ratio, "nlls": found.window_nll})
        if args.policy is not None:
            try:
                per_target.append(dash_row(dm, DashPolicy.load(args.policy), windows, target))
            except DashskipError as exc:
                print(f"dash at {target}: {exc}", flush=True)
        static = next((r for r in per_target if r["name"] == "best static schedule"), None)
        for row in per_target:
            mean = statistics.mean(row["nlls"])
            row["ppl"] = math.exp(mean)
            row["ppl_se"] = row["ppl"] * statistics.stdev(row["nlls"]) / math.sqrt(len(row["nlls"]))
            row["vs_full"] = paired_difference(row["nlls"], full)
            if static is not None and row is not static:
                row["vs_static"] = paired_difference(row["nlls"], static["nlls"])
        rows += per_target

    full_ppl = math.exp(statistics.mean(full))
    print(f"\nhost: {host_description()}; {args.model}, {windows.shape[0]} WikiText-2 test windows of 256 tokens, "
          f"{len(ladder)} static schedules; full model ppl {full_ppl:.2f}\n")  # fmt: skip
    print("| target ratio | configuration | ratio run | ppl ± SE | ΔNLL vs full ± SE | ΔNLL vs best static schedule "
          "± SE |\n|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        versus = "" if "vs_static" not in r else "{:+.4f} ± {:.4f}".format(*r["vs_static"])
        print(f"| {r['target']:.2f} | {r['name']} | {r['ratio']:.2f} | {r['ppl']:.2f} ± {r['ppl_se']:.2f} | "
              "{:+.4f} ± {:.4f} | ".format(*r["vs_full"]) + versus + " |")
    if args.plot:
        perplexity_lines(rows, "ratio", args.plot, "compute ratio (this machine's cost table)",
                         f"{args.model}, hindsight oracles, {host_description()}", full_ppl, log=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"host": host_description(), "args": {k: str(v) for k, v in vars(args).items()},
                                        "ladder": ladder, "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
