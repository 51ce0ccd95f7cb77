"""Two methods' per-window NLL, paired, on any text file (the sweep's tasks have no PTB): e.g. dp-llm against
static mixed precision on PTB test, which no calibration or tuning touched.

Usage: python benchmarks/paired_text.py --data ../shared/data/ptb/ptb.test.txt --method dp-llm --against mixed \
       --speedups 2.5,2.75,3.0,3.3 [--costs 0.060,0.228,0.331] [--limit 40]
`--costs` pins the decode cost table (skip, INT4, INT8; full = 1) so that compute ratios compare with runs on
another day or host; default: this host's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from dashskip.api import from_pretrained
from dashskip.core.costs import CostTable
from dashskip.data import load_text
from dashskip.eval.evaluation import perplexity, perplexity_windows
from dashskip.eval.tasks import paired_difference
from dashskip.methods import build_decider


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True)
    parser.add_argument("--method", default="dp-llm")
    parser.add_argument("--against", default="mixed")
    parser.add_argument("--speedups", default="2.5,2.75,3.0,3.3")
    parser.add_argument("--costs", default=None)
    parser.add_argument("--limit", type=int, default=40)
    args = parser.parse_args()
    dm = from_pretrained(args.model, wall_clock=False)
    ctx = dm.method_context(progress=False)
    if args.costs:
        table = dict(zip((0, 1, 2), map(float, args.costs.split(",")), strict=True)) | {4: 1.0}
        ctx = dataclasses.replace(ctx, costs=CostTable(table, table))
    windows = perplexity_windows(dm.tokenizer, load_text(args.data), 256, args.limit)

    def run(decider) -> tuple[list[float], float]:  # each window scored alone, as the table was
        result = perplexity(ctx.engine, windows, decider, ctx.costs, batch_size=1, progress=False)
        return result.window_nlls, result.compute_ratio

    full, _ = run(None)
    print(f"costs {ctx.costs.decode}; full model ppl {math.exp(sum(full) / len(full)):.2f} (n={len(full)})")
    for speedup in map(float, args.speedups.split(",")):
        ours, ratio = run(build_decider(ctx, args.method, speedup))
        other, other_ratio = run(build_decider(ctx, args.against, speedup))
        mean, se = paired_difference(ours, other)
        print(f"{speedup}: {args.method} ppl {math.exp(sum(ours) / len(ours)):.2f} (ratio {ratio:.3f}), "
              f"{args.against} {math.exp(sum(other) / len(other)):.2f} ({other_ratio:.3f}), "
              f"ΔNLL {mean:+.4f} ± {se:.4f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
