"""WikiText-2 test perplexity of DASH (async and sync decisions) vs static similarity skipping and the
quantization-only baselines (INT8 / INT4 on the least sensitive layers, static mixed precision, plus static
skipping) at matched ratios.

Usage: python benchmarks/policy_quality.py --model smollm2-135m --calibration CAL --limit 40 [--policy FILE]
Prints a Markdown table (and writes JSON with --out); every cell carries its SE and measured compute ratio.
"""

from __future__ import annotations

import argparse
import json
import time

from dashskip.api import bundled_policy, from_pretrained
from dashskip.data import load_text
from dashskip.errors import DashskipError
from dashskip.eval.evaluation import perplexity, perplexity_windows
from dashskip.measure.calibration import Calibration
from dashskip.methods import MethodOptions, build_decider
from dashskip.methods.dash.policy import DashPolicy
from dashskip.methods.quantized import QUANT_METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", default=None)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--speedups", default="1.33,1.67,2.0")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--matched",
        action="store_true",
        help="add async rows whose request is corrected once so the *measured* ratio meets the target",
    )
    args = parser.parse_args()
    policy_file = args.policy or bundled_policy(args.model)
    if policy_file is None:
        parser.error(f"no trained policy ships for '{args.model}'; pass --policy FILE")
    policy = DashPolicy.load(policy_file)
    dm = from_pretrained(args.model, policy=policy)
    windows = perplexity_windows(dm.tokenizer, load_text("wikitext2"), args.context, args.limit)
    calibration = Calibration.load(args.calibration)
    rows = []

    def record(method: str, target: float, decider) -> None:
        t0 = time.perf_counter()
        result = perplexity(dm.engine, windows, decider, dm.costs, progress=False)
        rows.append(
            {"method": method, "target": target, **result.as_dict(), "seconds": round(time.perf_counter() - t0)}
        )
        print(json.dumps(rows[-1]), flush=True)

    # The baselines come from the methods registry: "static" is static similarity skipping with the given
    # calibration, the QUANT_METHODS names are static mixed precision from the model's (cached) sensitivity table.
    ctx = dm.method_context(progress=False)
    options = MethodOptions(calibration=calibration)
    record("full", 1.0, None)
    for target in [float(s) for s in args.speedups.split(",")]:
        record("static-similarity", target, build_decider(ctx, "static", target, options))
        for name in QUANT_METHODS:
            try:
                record(name, target, build_decider(ctx, name, target, options))
            except DashskipError as exc:  # beyond what the method can reach: say so in the table
                rows.append({"method": name, "target": target, "unreachable": str(exc)})
        for mode in ("async", "sync"):
            record(f"dash-{mode}", target, policy.decider(target, mode))
        if args.matched:  # one multiplicative correction of the request, from the async row just measured
            request = target * target / rows[-2]["compute_ratio"]
            record("dash-async-matched", target, policy.decider(min(request, policy.max_speedup()), "async"))
    print(
        f"\nWikiText-2 test, {rows[0]['windows']} windows x {args.context} tokens (stride {args.context}), "
        f"model {args.model}; ppl ± SE (measured compute ratio)\n"
    )
    print("| method | " + " | ".join(f"{t}x" for t in args.speedups.split(",")) + " |")
    print("|---|" + "---|" * len(args.speedups.split(",")))
    print(
        f"| full | {rows[0]['ppl']:.2f} ± {rows[0]['ppl_se']:.2f} (1.00) |" + " |" * (len(args.speedups.split(",")) - 1)
    )
    for method in ("static-similarity", *QUANT_METHODS, "dash-async", "dash-sync", "dash-async-matched"):
        cells = [
            "unreachable" if "unreachable" in r else f"{r['ppl']:.2f} ± {r['ppl_se']:.2f} ({r['compute_ratio']:.2f})"
            for r in rows
            if r["method"] == method
        ]
        if cells:
            print(f"| {method} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
