"""Quality against decode speed on this host: DASH policies at wall-clock speedups against the static schedules
that decode as fast, over the same WikiText-2 windows.

A speedup S is decode wall clock against the engine's full path with the same LM head, as this machine's cost
table predicts it (layers, the head and the rest of a step, a policy's decisions: `CostTable.speedup`). For every
S, each policy runs at S (rate control holding every window); the static per-layer schedules of the paper's
baselines (sensitivity-greedy: `int8`, `mixed` = INT4/INT8, `mixed-skip` = skip/INT4/INT8) run at the compute
ratio that predicts the same S (they pay no decisions; a scheme whose states cannot go that fast is left out).
Each row: the predicted speedup, decode tok/s measured with `dashskip bench`'s in-run clock (32 tokens after a
64-token prompt, medians of --repeats; one short run per row, so noisy: `dashskip bench` checks predicted against
measured), WikiText-2 test perplexity ± SE over the windows, and for a policy the paired difference in mean NLL to
the best static schedule at the same S (± SE over the same windows; negative: the policy is better). With
--tasks (arc-easy, hellaswag, ...), each row also scores those tasks (lm-eval's prompts, `dashskip eval`'s
scorer, the first --task-limit examples) and a policy's row gives its paired difference in the task's primary
metric to the best static schedule on that task at the same S (positive: the policy is better).

Usage: python benchmarks/frontier.py --model smollm2-135m --policies A.safetensors [B ...] --speedups 1.33 1.67
       [--limit 40] [--head full] [--tasks arc-easy hellaswag --task-limit 100] [--out frontier.json]
       [--plot frontier.png]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from dashskip.api import from_pretrained
from dashskip.core.decisions import Decider
from dashskip.core.kernels import host_description
from dashskip.data import load_text, token_windows
from dashskip.errors import DashskipError
from dashskip.eval.bench import time_engine
from dashskip.eval.evaluation import perplexity, perplexity_windows
from dashskip.eval.plots import perplexity_lines
from dashskip.eval.tasks import TaskSettings, paired_difference, run_task
from dashskip.methods.dash.policy import DashPolicy
from dashskip.methods.quantized import QUANT_METHODS, sensitivity_for, static_mixed

STATIC = ("int8", "mixed", "mixed-skip")


def scored(dm, windows: torch.Tensor, decider: Decider | None) -> tuple[list[float], float]:
    """Per-window mean NLL and the predicted speedup of the states that ran (decode costs, this machine)."""
    result = perplexity(dm.engine, windows, decider, dm.costs, progress=False)
    n, key = dm.backbone.num_layers, decider.traits.decisions if decider is not None else None
    return result.window_nlls, dm.costs.speedup_at(result.compute_ratio, n, dm.backbone.head_precision, key)


def versus(paired: tuple[str, float, float] | None, digits: int) -> str:
    """A paired difference to the best static schedule as a table cell (empty where there is none)."""
    return "" if paired is None else f"{paired[1]:+.{digits}f} ± {paired[2]:.{digits}f} ({paired[0]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policies", type=Path, nargs="+", required=True)
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.33, 1.67])
    parser.add_argument("--limit", type=int, default=40, help="WikiText-2 test windows of 256 tokens")
    parser.add_argument("--head", default="full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", nargs="*", default=[], help="tasks scored beside WikiText-2 (arc-easy, ...)")
    parser.add_argument("--task-limit", type=int, default=100, help="examples per task, the first ones")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="also draw perplexity against predicted speedup here (.png)")
    args = parser.parse_args()
    dm = from_pretrained(args.model, head=args.head)
    policies = {path.parent.name if path.name == "policy.safetensors" else path.stem: DashPolicy.load(path)
                for path in args.policies}  # fmt: skip
    for policy in policies.values():
        policy.check(dm.fingerprint)
        dm.costs = policy.wall_clock_costs(dm.engine, dm.fingerprint, args.head)  # one table, every policy's key
    windows = perplexity_windows(dm.tokenizer, load_text("wikitext2"), 256, args.limit)
    prompt = token_windows(dm.tokenizer, load_text("wikitext2"), 1, 64, seed=0)
    sensitivity = sensitivity_for(dm.method_context())
    n = dm.backbone.num_layers
    rows: list[dict] = []

    def add(speedup: float | None, name: str, decider: Decider | None) -> dict:
        nlls, predicted = scored(dm, windows, decider)
        timed = time_engine(name, dm, prompt, decider, 32, args.repeats)
        row = {"asked": speedup, "name": name, "predicted": round(predicted, 3), "decode_tok_s": timed.decode_tok_s,
               "ppl": math.exp(statistics.mean(nlls)), "nlls": nlls}  # fmt: skip
        row["ppl_se"] = row["ppl"] * statistics.stdev(nlls) / math.sqrt(len(nlls))
        for task in args.tasks:
            result = run_task(dm.engine, dm.tokenizer, task, decider, dm.costs, TaskSettings(limit=args.task_limit),
                              progress=False)  # fmt: skip
            metric = result.metrics[result.primary]
            row[task] = {"metric": result.primary, "value": metric.value, "se": metric.se, "scores": result.scores}
        rows.append(row)
        tasks = "".join(f", {t} {row[t]['value']:.3f} ± {row[t]['se']:.3f}" for t in args.tasks)
        print(f"{name} at {speedup}: predicted {predicted:.2f}x, {timed.decode_tok_s:.1f} tok/s, ppl {row['ppl']:.2f} "
              f"± {row['ppl_se']:.2f}{tasks}", flush=True)  # fmt: skip
        return row

    full = add(None, "full", None)
    for speedup in args.speedups:
        target = dm.costs.compute_target(speedup, n, args.head)
        statics, seen = [], {}
        for method in STATIC:
            try:
                schedule = static_mixed(sensitivity, dm.costs, target, QUANT_METHODS[method])
            except DashskipError as exc:  # this static scheme's states cannot go this fast
                print(f"static {method} at {speedup}: {exc}", flush=True)
                continue
            states = tuple(schedule.states)
            if states in seen:  # a scheme that did not use its extra states: the same schedule again
                print(f"static {method} at {speedup}: the same schedule as static {seen[states]}", flush=True)
                continue
            seen[states] = method
            statics.append(add(speedup, f"static {method}", schedule))
        best = min(statics, key=lambda r: r["ppl"]) if statics else None
        for name, policy in policies.items():
            try:
                decider = policy.decider(speedup, costs=dm.costs, head=args.head)
            except DashskipError as exc:  # beyond this policy here: say so and go on
                print(f"dash {name} at {speedup}: {exc}", flush=True)
                continue
            row = add(speedup, f"dash {name}", decider)
            if best is not None:
                row["vs_static"] = (best["name"], *paired_difference(row["nlls"], best["nlls"]))
            for task in args.tasks if statics else ():  # higher is better: the best static is the highest
                top = max(statics, key=lambda r, t=task: r[t]["value"])
                row[task]["vs_static"] = (top["name"], *paired_difference(row[task]["scores"], top[task]["scores"]))

    full_tok_s = full["decode_tok_s"]
    print(f"\nhost: {host_description()}; {args.model}, {args.head} head, {windows.shape[0]} WikiText-2 test windows "
          f"of 256, decode timed on a 64-token prompt + 32 tokens\n")  # fmt: skip
    heads = "".join(f" {t} ± SE | Δ vs best static ± SE |" for t in args.tasks)
    print("| asked | configuration | predicted speedup | decode tok/s (x full) | ppl ± SE | ΔNLL vs best static at "
          f"that speed ± SE (paired) |{heads}\n|---|---|---|---|---|---|{'---|---|' * len(args.tasks)}")  # fmt: skip
    for r in rows:
        cells = [f"{r['ppl']:.2f} ± {r['ppl_se']:.2f}", versus(r.get("vs_static"), 4)]
        for task in args.tasks:
            cells += [f"{r[task]['value']:.3f} ± {r[task]['se']:.3f}", versus(r[task].get("vs_static"), 3)]
        asked = "-" if r["asked"] is None else f"{r['asked']:.2f}"
        print(f"| {asked} | {r['name']} | {r['predicted']:.2f} | {r['decode_tok_s']:.1f} "
              f"({r['decode_tok_s'] / full_tok_s:.2f}x) | " + " | ".join(cells) + " |")
    if args.plot:
        perplexity_lines(rows, "predicted", args.plot,
                         "decode speedup over the full path (predicted, this machine's cost table)",
                         f"{args.model}, {args.head} head, {host_description()}",
                         cap=1.15 * full["ppl"])  # a collapsed schedule is marked, not drawn to scale  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"host": host_description(), "args": vars(args), "rows": rows}, indent=1,
                                       default=str))  # paths as text  # fmt: skip


if __name__ == "__main__":
    main()
