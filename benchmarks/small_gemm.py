"""The small-row fp32 kernel against torch's F.linear (BLAS), side by side in one process on SmolLM2:
all 210 decoder linears and the LM head for 1 and 5 rows, then whole engine steps of 1 and 5 tokens (a decode
step and a lossless verification of 4 drafts) with the kernel on and off. Medians over repetitions.

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
from dashskip.states import StatefulLinear


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (packs the weights on first use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def kernel(on: bool) -> None:
    """Switch the kernel in this process (the switch is read once per process otherwise)."""
    os.environ["DASHSKIP_SMALL_GEMM"] = "1" if on else "0"
    kernels.extension.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    dm = from_pretrained("smollm2-135m")
    bb, engine = dm.backbone, dm.engine
    linears = [m for m in bb.layers.modules() if isinstance(m, StatefulLinear)]
    ids = torch.randint(100, 10000, (1, 64), generator=torch.Generator().manual_seed(0))
    session = engine.new_session(1, 128)
    engine.step(ids, session)
    prompt = session.cache.length
    print(f"threads {torch.get_num_threads()}, {len(linears)} linears, median of {args.repeats} (ms)")
    print("| work | rows | F.linear (BLAS) | small-row kernel | ratio |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in (1, 5):
            xs = {m.in_features: torch.randn(rows, m.in_features) for m in linears}
            h = torch.randn(rows, bb.config.hidden_size)
            kernel(True)
            jobs = {
                "all decoder linears": (
                    lambda xs=xs: [F.linear(xs[m.in_features], m.weight) for m in linears],
                    lambda xs=xs: [m.full(xs[m.in_features]) for m in linears],
                ),
                "LM head": (lambda h=h: F.linear(h, bb.lm_head.weight), lambda h=h: bb.head(h)),
            }
            for name, (blas, ours) in jobs.items():
                a, b = median_ms(blas, args.repeats), median_ms(ours, args.repeats)
                print(f"| {name} | {rows} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
            step_ms = {}
            for on in (False, True):
                kernel(on)

                def step(rows: int = rows) -> None:
                    session.cache.length = prompt
                    bb.logits(engine.step(ids[:, :rows], session).hidden[0])

                step_ms[on] = median_ms(step, args.repeats)
            print(f"| engine step, full path + head | {rows} | {step_ms[False]:.1f} | {step_ms[True]:.1f} | "
                  f"{step_ms[False] / step_ms[True]:.2f}x |")  # fmt: skip
    kernel(True)


if __name__ == "__main__":
    main()
