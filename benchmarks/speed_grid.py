"""The standard speed grid: `dashskip bench` for both models, every method and operating point, batch 1 and 8,
plus the quality side of the speed options (low-precision LM head, batch-majority voting); writes
docs/benchmarks.md.

Usage: python benchmarks/speed_grid.py [--quick]    (about 20 minutes on 2 cores; --quick: fewer repetitions)
Run it on an otherwise idle machine: every number is a wall-clock median.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from dashskip.api import from_pretrained
from dashskip.bench import run_bench
from dashskip.data import load_text
from dashskip.decisions import BatchMajority
from dashskip.errors import DashskipError
from dashskip.evaluation import perplexity, perplexity_windows

ROOT = Path(__file__).resolve().parents[1]
SMOL = "smollm2-135m"
GEMMA = "gemma3-270m"


def grid() -> list[dict]:
    """(model, method, speedup, batch, mode, majority, head) for every benchmark row."""
    rows = []
    for speedup in (1.33, 1.67, 2.0):
        rows.append(dict(name=SMOL, method="dash", speedup=speedup, batch=1))
    rows.append(dict(name=SMOL, method="dash", speedup=2.0, batch=1, mode="sync"))
    rows.append(dict(name=SMOL, method="dash", speedup=2.0, batch=1, head="int8"))
    rows.append(dict(name=SMOL, method="int8", batch=1))
    rows.append(dict(name=SMOL, method="int4", batch=1))
    rows.append(dict(name=SMOL, method="dash", speedup=2.0, batch=8))
    rows.append(dict(name=SMOL, method="dash", speedup=2.0, batch=8, majority=True))
    rows.append(dict(name=SMOL, method="int8", batch=8))
    rows.append(dict(name=SMOL, method="dash", speedup=2.0, batch=1, prompt_len=512, new_tokens=4))
    rows.append(dict(name=GEMMA, method="int8", batch=1))
    rows.append(dict(name=GEMMA, method="int8", batch=1, head="int8"))
    return rows


def speed_table(results: list[dict]) -> list[str]:
    lines = [
        "| model | method | batch | prompt | head | compute ratio | decode tok/s (method / engine full / transformers) "
        "| decode vs engine full | decode vs transformers | prefill vs engine full | policy share | full-path weight "
        "reads (% of bandwidth) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        cfg, rows, r = res["config"], res["rows"], res["ratios"]
        hf, full, method = rows
        label = method["name"].removeprefix("engine, ").split(" (")[0]
        lines.append(
            f"| {cfg['model']} | {label} | {cfg['batch']} | {cfg['prompt_len']} | {cfg['head']} | "
            f"{method['compute_ratio']:.2f} | {method['decode_tok_s']:.1f} / {full['decode_tok_s']:.1f} / "
            f"{hf['decode_tok_s']:.1f} | {r['decode_vs_engine_full']:.2f}x | {r['decode_vs_transformers']:.2f}x | "
            f"{r['prefill_vs_engine_full']:.2f}x | {method['policy_share']:.1%} | {full['weight_read_gbs']:.1f} GB/s "
            f"({full['bandwidth_fraction']:.0%}) |"
        )
    return lines


def quality(limit: int) -> list[str]:
    """WikiText-2 test perplexity of the speed options, windows of 256 tokens, batch of 8 windows per step."""
    dm = from_pretrained(SMOL, speedup=2.0)
    windows = perplexity_windows(dm.tokenizer, load_text("wikitext2"), 256, limit)
    lines = ["| configuration | ppl ± SE | compute ratio |", "|---|---|---|"]
    configs = [
        ("full layers, full head", None, "full"),
        ("full layers, bf16 head", None, "bf16"),
        ("full layers, int8 head", None, "int8"),
        ("dash 2.0x, per-row states (batch 8)", dm.policy.decider(2.0), "full"),
        ("dash 2.0x, batch-majority voting (batch 8)", BatchMajority(dm.policy.decider(2.0)), "full"),
    ]
    for label, decider, head in configs:
        dm.backbone.set_head(head)
        r = perplexity(dm.engine, windows, decider, dm.costs, batch_size=8, progress=False)
        lines.append(f"| {label} | {r.ppl:.2f} ± {r.ppl_se:.2f} | {r.compute_ratio:.2f} |")
        print(lines[-1], flush=True)
    dm.backbone.set_head("full")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 5")
    parser.add_argument("--limit", type=int, default=40, help="perplexity windows for the quality table")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    results = []
    started = time.time()
    for spec in grid():
        spec = {"prompt_len": 64, "new_tokens": 32, **spec}
        try:
            res = run_bench(repeats=repeats, progress=False, **spec).to_dict()
        except DashskipError as exc:
            print(f"skipped {spec}: {exc}", file=sys.stderr)
            continue
        results.append(res)
        print(json.dumps({"config": res["config"], "ratios": res["ratios"]}), flush=True)
    quality_lines = quality(args.limit)
    (ROOT / "out").mkdir(exist_ok=True)
    (ROOT / "out" / "speed_grid.json").write_text(json.dumps(results, indent=2))
    bandwidth = results[0]["bandwidth_gbs"] if results else float("nan")
    page = [
        "# Benchmarks",
        "",
        f"Generated by `python benchmarks/speed_grid.py{' --quick' if args.quick else ''}` "
        f"({time.time() - started:.0f} s; {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, fp32 weights, measured read bandwidth {bandwidth:.1f} GB/s). Each row is one "
        "`dashskip bench` run: transformers `generate` on a pristine copy of the model, the engine's full path and "
        f"the method, one after the other in one process, medians of {repeats} repetitions after a warm-up; "
        "prompts are WikiText-2 test windows. Decode time per step = (T(32 new tokens) - T(1)) / 31. Reproduce one "
        "row with e.g. `dashskip bench --model smollm2-135m --method dash --speedup 2.0 --batch 1`. Analysis, "
        "profiles and the GPU design: [speed.md](speed.md).",
        "",
        "## Speed",
        "",
        *speed_table(results),
        "",
        "Compute ratio: from the measured per-state cost table (layers only). Policy share: time spent deciding per",
        "decode step / time per step. Weight reads: bytes of weights the engine's full path reads per decode step",
        "(all layers + LM head) / time per step, and that as a fraction of the measured memory bandwidth.",
        "",
        f"## Quality of the speed options (SmolLM2-135M, WikiText-2 test, {args.limit} windows x 256 tokens)",
        "",
        *quality_lines,
        "",
    ]
    args.out.write_text("\n".join(page))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
