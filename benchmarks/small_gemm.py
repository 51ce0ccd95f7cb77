"""dashskip's compiled CPU kernels and flat layers against torch's ops, side by side in one process on SmolLM2.

1. Linears: all 210 decoder linears and the LM head, fp32 (BLAS `F.linear` vs the small-row kernel) for 1 and 5
   rows, INT8 weight-only (torch's `_weight_int8pack_mm` vs dashskip's) for 1 row.
2. Whole engine steps (norm and head included) in three engine configurations: transformers' decoder layers with
   torch's ops only (`DASHSKIP_SMALL_GEMM=0`), the same layers with dashskip's kernels, and the flat Llama layer
   with the kernels and compiled small ops (the default). Steps: a full decode step (1 token), a lossless
   verification of 4 drafts (5 tokens), an INT8 draft step (INT8 layers and head), a DASH 2.0x draft step.
Medians over repetitions.

Usage: python benchmarks/small_gemm.py [--repeats 21]      (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.nn import functional as F

from dashskip import kernels
from dashskip.api import from_pretrained
from dashskip.core.decisions import FixedStates
from dashskip.core.states import State, StatefulLinear


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (packs the weights on first use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def kernel(on: bool) -> None:
    """Switch the kernels in this process (the switch is read once per process otherwise)."""
    os.environ["DASHSKIP_SMALL_GEMM"] = "1" if on else "0"
    kernels.extension.cache_clear()


def linears_table(bb, repeats: int) -> None:
    linears = [m for m in bb.layers.modules() if isinstance(m, StatefulLinear)]
    print(f"threads {torch.get_num_threads()}, {len(linears)} linears, median of {repeats} (ms)\n")
    print("| work | rows | torch | dashskip | ratio |")
    print("|---|---|---|---|---|")
    for rows in (1, 5):
        xs = {m.in_features: torch.randn(rows, m.in_features) for m in linears}
        h = torch.randn(rows, bb.config.hidden_size)
        jobs = {
            "fp32 decoder linears": (
                lambda xs=xs: [F.linear(xs[m.in_features], m.weight) for m in linears],
                lambda xs=xs: [m.full(xs[m.in_features]) for m in linears],
            ),
            "fp32 LM head": (lambda h=h: F.linear(h, bb.lm_head.weight), lambda h=h: bb.head(h)),
        }
        if rows == 1:
            jobs["INT8 decoder linears"] = (
                lambda xs=xs: [
                    torch._weight_int8pack_mm(xs[m.in_features].bfloat16(), *m.packed(State.INT8)) for m in linears
                ],  # fmt: skip
                lambda xs=xs: [m.int8(xs[m.in_features], *m.packed(State.INT8)) for m in linears],
            )
        for name, (theirs, ours) in jobs.items():
            a, b = median_ms(theirs, repeats), median_ms(ours, repeats)
            print(f"| {name} | {rows} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


def steps_table(dm, repeats: int) -> None:
    bb, engine, n = dm.backbone, dm.engine, dm.backbone.num_layers
    ids = torch.randint(100, 10000, (1, 69), generator=torch.Generator().manual_seed(0))
    session = engine.new_session(1, 128)
    engine.step(ids[:, :64], session)
    prompt = session.cache.length
    int8 = FixedStates([4] + [int(State.INT8)] * (n - 2) + [4])
    steps = {
        "full decode step (1 token)": (1, None, "full"),
        "lossless verification (5 tokens)": (5, None, "full"),
        "INT8 draft step (INT8 layers and head)": (1, int8, "int8"),
        "DASH 2.0x draft step (INT8 head)": (1, dm.policy.decider(2.0), "int8"),
    }
    flat = bb.flat
    configs = {"transformers layers, torch ops": (None, False), "transformers layers, kernels": (None, True),
               "flat layers, kernels (default)": (flat, True)}  # fmt: skip
    print(f"\n| step (ms, median of {repeats}) | {' | '.join(configs)} | default vs torch ops |")
    print("|---|" + "---|" * (len(configs) + 1))
    for name, (tokens, decider, head) in steps.items():
        times = []
        for layers, on in configs.values():
            bb.flat = layers
            kernel(on)

            def step(tokens=tokens, decider=decider, head=head) -> None:
                session.cache.length = prompt
                bb.logits(engine.step(ids[:, 64 : 64 + tokens], session, decider).hidden[0], head)

            times.append(median_ms(step, repeats))
        cells = " | ".join(f"{t:.1f}" for t in times)
        print(f"| {name} | {cells} | {times[0] / times[-1]:.2f}x |")
    bb.flat = flat
    kernel(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    dm = from_pretrained("smollm2-135m", speedup=2.0)
    with torch.inference_mode():
        linears_table(dm.backbone, args.repeats)
        steps_table(dm, args.repeats)


if __name__ == "__main__":
    main()
