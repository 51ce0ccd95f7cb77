"""Lossless (self-speculative) decoding on SmolLM2, batch 1: full greedy vs drafting with DASH at several
operating points, with a fixed early exit (LayerSkip-style) and with a fixed skipped set (SWIFT /
Draft&Verify-style) at matched draft cost. Every configuration's output is checked token-identical to full
greedy. Writes the "Lossless mode" section of docs/benchmarks.md.

Each repetition runs every configuration on one prompt before moving to the next prompt, so load on this shared
host hits all of them alike; a configuration's ratio is its tokens/s over full greedy's in the same repetition,
and the table gives medians over repetitions with their range.

Usage: python benchmarks/lossless.py [--prompts 10] [--new-tokens 128] [--k 4] [--reps 3]   (~7 min per rep)
       python benchmarks/lossless.py --policy runs/x/policy.safetensors --speedups 1.6,1.9   (another policy's
       drafts at the given operating points; prints its rows and leaves benchmarks.md as it is)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dashskip.api import from_pretrained
from dashskip.core.decisions import AtMost, Decider, FixedStates
from dashskip.core.states import State
from dashskip.data import load_text, token_windows
from dashskip.measure.calibration import calibrate
from dashskip.methods.exits import FixedExit
from dashskip.runtime.engine import Engine
from dashskip.runtime.generation import DraftLength, generate, generate_lossless

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- lossless:begin -->", "<!-- lossless:end -->"


@dataclass
class Config:
    """One way to decode; `draft` None is full greedy decoding without drafting."""

    name: str
    draft: Decider | None = None
    length: Callable[[], DraftLength] | None = None
    draft_engine: Engine | None = None


def decode(engine: Engine, config: Config, ids: torch.Tensor, new_tokens: int):
    """(seconds, sequences, speculative stats or None) of one prompt."""
    t0 = time.perf_counter()
    if config.draft is None:
        out, stats = generate(engine, ids, max_new_tokens=new_tokens), None
    else:
        out, stats = generate_lossless(
            engine,
            ids,
            config.draft,
            max_new_tokens=new_tokens,
            length=config.length(),
            draft_engine=config.draft_engine,
        )
    return time.perf_counter() - t0, out.sequences, stats


def configs(dm, k: int, speedups: list[float] | None = None) -> list[Config]:
    engine, bb, n = dm.engine, dm.backbone, dm.backbone.num_layers
    adaptive = lambda: DraftLength(k, adaptive=True)  # noqa: E731
    fixed = lambda: DraftLength(k, adaptive=False)  # noqa: E731
    top = round(dm.policy.max_speedup() - 0.01, 2)
    out = [Config("full greedy (no drafting)")]
    dash = lambda s: AtMost(dm.policy.decider(s), int(State.INT8))  # noqa: E731  (what `--lossless` drafts with)
    points = speedups or (1.33, 1.67, 2.0, top)
    out += [Config(f"DASH draft {s}x, full layers in INT8, fixed k={k}", dash(s), fixed) for s in points]
    out.append(Config(f"DASH draft 2.0x, full layers in INT8, adaptive k<={k}", dash(2.0), adaptive))
    out += [Config(f"DASH draft {s}x as is, fixed k={k}", dm.policy.decider(s), fixed) for s in (2.0, top)]
    every = [FixedStates([4] + [state] * (n - 2) + [4]) for state in (2, 1)]  # `--draft int8|int4`
    out.append(Config(f"INT8 on every inner layer, fixed k={k}", every[0], fixed))
    out.append(Config(f"INT8 on every inner layer, adaptive k<={k + 2}", every[0], lambda: DraftLength(k + 2)))
    out.append(Config(f"INT4 on every inner layer, fixed k={k}", every[1], fixed))
    # Fixed drafters never read their skipped layers' K/V, so they run on a 'copy'-rule engine (free skips).
    # Matched draft cost: DASH at 2.0x runs ~n/2 full-layer equivalents per token.
    keep = n // 2
    fixed_engine = Engine(bb, engine.scales, "copy")
    out.append(Config(f"early exit after {keep} layers (LayerSkip-style), adaptive k<={k}", FixedExit(n, keep),
                      adaptive, fixed_engine))  # fmt: skip
    windows = token_windows(dm.tokenizer, load_text("wikitext2-valid"), 16, 256, seed=0)
    cosine = calibrate(dm.model, windows, dm.fingerprint, progress=False).cosine
    skipped = sorted(range(1, n - 1), key=lambda i: cosine[i], reverse=True)[: n - keep]
    static = FixedStates([0 if i in skipped else 4 for i in range(n)])
    out.append(Config(f"static skip of the {n - keep} most similar layers, adaptive k<={k}", static, adaptive,
                      fixed_engine))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="most tokens drafted per round")
    parser.add_argument("--reps", type=int, default=3, help="repetitions; ratios are medians over them")
    parser.add_argument("--policy", help="DASH policy file to draft with (default: the shipped one)")
    parser.add_argument("--speedups", help="comma-separated DASH operating points (default: 1.33,1.67,2.0,top)")
    args = parser.parse_args()
    started = time.time()
    dm = from_pretrained("smollm2-135m", speedup=2.0, policy=args.policy)
    prompts = list(token_windows(dm.tokenizer, load_text("wikitext2"), args.prompts, 64, seed=3).split(1))
    todo = configs(dm, args.k, [float(s) for s in args.speedups.split(",")] if args.speedups else None)
    for config in todo:  # warm-up: first calls, compiled kernels, the copy-rule engine's buffers
        decode(dm.engine, config, prompts[0], 8)
    seconds = [[0.0] * len(todo) for _ in range(args.reps)]
    outputs: list[list[torch.Tensor]] = [[] for _ in todo]
    totals = [{"rounds": 0, "drafted": 0, "accepted": 0} for _ in todo]
    for rep in range(args.reps):
        for ids in prompts:
            for c, config in enumerate(todo):
                spent, sequences, stats = decode(dm.engine, config, ids, args.new_tokens)
                seconds[rep][c] += spent
                if rep == 0:
                    outputs[c].append(sequences)
                    for key in totals[c]:
                        totals[c][key] += getattr(stats, key) if stats is not None else 0
        print(json.dumps({"rep": rep, "full_tok_s": args.prompts * args.new_tokens / seconds[rep][0]}), flush=True)
    rows = []
    for c, config in enumerate(todo):
        tok_s = [args.prompts * args.new_tokens / seconds[rep][c] for rep in range(args.reps)]
        ratios = [seconds[rep][0] / seconds[rep][c] for rep in range(args.reps)]
        drafted = totals[c]["drafted"]
        row = {
            "name": config.name,
            "tok_s": statistics.median(tok_s),
            "ratio": statistics.median(ratios),
            "ratio_range": (min(ratios), max(ratios)),
            "acceptance": totals[c]["accepted"] / drafted if drafted else 1.0,
            "accepted_per_round": totals[c]["accepted"] / max(totals[c]["rounds"], 1),
            "identical": all(torch.equal(a, b) for a, b in zip(outputs[c], outputs[0], strict=True)),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.policy is None and args.speedups is None:
        write_section(rows, args, time.time() - started, dm.backbone.num_layers // 2)


def write_section(rows: list[dict], args, elapsed: float, keep: int) -> None:
    lines = [
        BEGIN,
        "## Lossless mode (SmolLM2-135M, batch 1, greedy)",
        "",
        f"`python benchmarks/lossless.py --prompts {args.prompts} --new-tokens {args.new_tokens} --k {args.k} "
        f"--reps {args.reps}` ({elapsed:.0f} s): {args.prompts} WikiText-2 test prompts of 64 tokens, "
        f"{args.new_tokens} new tokens each, after a warm-up. Each repetition runs every configuration on a prompt "
        "before the next prompt; ratios are tokens/s over full greedy's in the same repetition, medians over "
        f"{args.reps} repetitions [range]. Drafts use the INT8 LM head, verification the full one. Every drafted "
        "configuration's output was compared with full greedy decoding token by token.",
        "",
        "| configuration | tok/s | vs full greedy [range] | acceptance | accepted per round | output identical |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row["ratio_range"]
        lines.append(
            f"| {row['name']} | {row['tok_s']:.2f} | {row['ratio']:.2f}x [{low:.2f}-{high:.2f}] | "
            f"{row['acceptance']:.2f} | {row['accepted_per_round']:.2f} | {'yes' if row['identical'] else 'NO'} |"
        )
    lines += [
        "",
        f"The early exit drafts from layer {keep}'s output through the final norm and head, as LayerSkip does, but "
        "SmolLM2 was not trained with LayerSkip's early-exit loss: its acceptance is how often a mid-layer argmax "
        "matches the full model's. The static skip reuses the calibrated skip scales. 'Full layers in INT8': the "
        "policy's choices with INT8 wherever it chose full precision, what `--lossless` drafts with; 'as is': the "
        "DASH path unchanged.",
        END,
    ]
    page = ROOT / "docs" / "benchmarks.md"
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + "\n".join(lines) + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    page.write_text(text)
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
