"""dashskip's compiled CPU kernels against torch's ops, side by side in one process on SmolLM2.

1. Linears: every product a full decoder step runs (per layer the fused q/k/v, o, the fused gate/up and down:
   `core.linear.Linear`) and the LM head, fp32 (the full-precision handler's kernels: torch's `F.linear` vs
   dashskip's packed small-row kernel) for 1 and 5 rows, INT8 weight-only (the INT8 handler's kernels: torch's
   `_weight_int8pack_mm` vs dashskip's packed one) for 1 row. A third column times the linears as the engine runs
   them: the kernel `core.kernels.CHOICE` measured as the fastest on this host. A kernel this host cannot run
   (the extension did not build, no AVX-512 for the INT8 one) shows n/a.
2. Whole engine steps (norm and head included) under the three kernel settings: torch's ops only
   (`DASHSKIP_SMALL_GEMM=0`), dashskip's kernels forced wherever they apply (`=1`: the first candidate after
   torch's op, unmeasured) and the measured choice (the default). Steps: a full decode step (1 token), a lossless
   verification of 4 drafts (5 tokens), an INT8 draft step (INT8 layers and head), a DASH 2.0x draft step.
Medians over repetitions.

Ported to the current layout: the per-linear fp32/INT8 kernel classes and the switch between transformers'
decoder layers and the flat layer are gone (the engine always runs its own flat `models.layer.DecoderLayer`;
weights are packed per handler and kernel). So the linears are the fused `Linear`s timed through their
handlers' kernels, and the step table's configurations are the kernel settings of `core.kernels` instead of
"transformers layers, torch ops / transformers layers, kernels / flat layers, kernels".

Usage: python benchmarks/small_gemm.py [--repeats 21]      (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dashskip.api import from_pretrained
from dashskip.core import kernels
from dashskip.core.decisions import inner_layers
from dashskip.core.handlers import Handler
from dashskip.core.linear import Linear
from dashskip.core.states import State, spec

FULL_STEP = ("qkv", "o", "gate_up", "down")  # what a layer in full runs (`kv` only serves skipped tokens)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (packs the weights, measures a kernel choice on first use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def kernel_mode(value: str | None) -> None:
    """Set DASHSKIP_SMALL_GEMM in this process: '0', '1', or None (the measured default)."""
    if value is None:
        os.environ.pop("DASHSKIP_SMALL_GEMM", None)
    else:
        os.environ["DASHSKIP_SMALL_GEMM"] = value
    kernels.extension.cache_clear()  # the extension is looked up once per process otherwise
    kernels.CHOICE.forget()  # its in-memory choices do not depend on the setting


def kernel_call(lin: Linear, handler: Handler, kernel: str, x: torch.Tensor):
    """One product of `lin` through `kernel` of `handler` (its layout made once), or None if `x` cannot take it."""
    if kernel not in handler.kernels(x):
        return None
    key = (handler.name, kernel)
    form = lin.form(handler)
    if key not in lin.prepared:
        lin.prepared[key] = handler.prepare(kernel, form)
    prepared = lin.prepared[key]
    return lambda: handler.run(kernel, prepared, x, lin.out_features)


def time_kernel(
    linears: list[Linear], handler: Handler, kernel: str, xs: dict[int, torch.Tensor], repeats: int
) -> float | None:
    """Median ms of every linear through one kernel; None where a linear cannot run it (as `kernels.measure`
    treats a kernel that fails on a shape)."""
    try:
        calls = [kernel_call(lin, handler, kernel, xs[lin.in_features]) for lin in linears]
        if any(c is None for c in calls):
            return None
        return median_ms(lambda: [c() for c in calls], repeats)
    except RuntimeError:
        return None


def time_chosen(linears: list[Linear], handler: Handler, xs: dict[int, torch.Tensor], repeats: int) -> float:
    """Median ms of every linear as the engine runs it: the kernel `kernels.CHOICE` picks for this host."""
    return median_ms(lambda: [lin.run_handler(handler, xs[lin.in_features]) for lin in linears], repeats)


def cell(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms:.1f}"


def linears_table(bb, repeats: int) -> None:
    linears = [layer.linears()[name] for layer in bb.layers for name in FULL_STEP]
    full, int8 = spec(State.FULL).handler, spec(State.INT8).handler
    print(f"threads {torch.get_num_threads()}, {len(linears)} decoder products, median of {repeats} (ms)\n")
    print("| work | rows | torch | dashskip | measured choice (default) | dashskip vs torch |")
    print("|---|---|---|---|---|---|")
    for rows in (1, 5):
        xs = {lin.in_features: torch.randn(rows, lin.in_features) for lin in [*linears, bb.head]}
        jobs = [(f"fp32 decoder linears ({len(linears)})", linears, full),
                (f"fp32 LM head ({bb.head.out_features} x {bb.head.in_features})", [bb.head], full)]  # fmt: skip
        if rows == 1:
            jobs.append(("INT8 decoder linears", linears, int8))
        for name, group, handler in jobs:
            theirs = time_kernel(group, handler, "torch", xs, repeats)
            ours = time_kernel(group, handler, "packed", xs, repeats)
            chosen = time_chosen(group, handler, xs, repeats)
            ratio = f"{theirs / ours:.2f}x" if theirs and ours else "n/a"
            print(f"| {name} | {rows} | {cell(theirs)} | {cell(ours)} | {chosen:.1f} | {ratio} |")


def steps_table(dm, repeats: int) -> None:
    bb, engine, n = dm.backbone, dm.engine, dm.backbone.num_layers
    ids = torch.randint(100, 10000, (1, 69), generator=torch.Generator().manual_seed(0))
    session = engine.new_session(1, 128)
    engine.step(ids[:, :64], session)
    prompt = session.length
    steps = {
        "full decode step (1 token)": (1, None, "full"),
        "lossless verification (5 tokens)": (5, None, "full"),
        "INT8 draft step (INT8 layers and head)": (1, inner_layers(n, int(State.INT8)), "int8"),
        "DASH 2.0x draft step (INT8 head)": (1, dm.policy.decider(2.0), "int8"),
    }
    configs = {"torch ops only (DASHSKIP_SMALL_GEMM=0)": "0", "kernels forced (DASHSKIP_SMALL_GEMM=1)": "1",
               "measured choice (default)": None}  # fmt: skip
    print(f"\n| step (ms, median of {repeats}) | {' | '.join(configs)} | default vs torch ops |")
    print("|---|" + "---|" * (len(configs) + 1))
    for name, (tokens, decider, head) in steps.items():
        times = []
        for setting in configs.values():
            kernel_mode(setting)

            def step(tokens=tokens, decider=decider, head=head) -> None:
                session.truncate(prompt)
                bb.logits(engine.step(ids[:, 64 : 64 + tokens], session, decider).hidden[0], head)

            times.append(median_ms(step, repeats))
        cells = " | ".join(f"{t:.1f}" for t in times)
        print(f"| {name} | {cells} | {times[0] / times[-1]:.2f}x |")
    kernel_mode(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    dm = from_pretrained("smollm2-135m", speedup=2.0)
    with torch.inference_mode():
        kernel_mode(None)
        linears_table(dm.backbone, args.repeats)
        steps_table(dm, args.repeats)


if __name__ == "__main__":
    main()
