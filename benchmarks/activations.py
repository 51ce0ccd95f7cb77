"""What int8 activations cost in quality: each configuration scored on the same WikiText-2 windows with the INT8 and
INT4 states multiplying bf16 rows (`DASHSKIP_ACTIVATIONS=bf16`, torch's weight-only arithmetic) and int8 rows
(the default, the integer kernels' arithmetic), paired per window.

Prints per configuration: perplexity ± SE under each, and the paired difference of the mean NLL ± its SE (the
windows are the same, so the paired SE is far below either perplexity's). Scoring runs the prefill kernels; they
multiply the same rounded rows as the decode kernels (tests/test_kernels.py), so the quality is the arithmetic's.

Usage: python benchmarks/activations.py [--model smollm2-135m] [--windows 40] [--speedup 2.0]
"""

import argparse
import math
import os

import torch

from dashskip.api import from_pretrained
from dashskip.core.decisions import inner_layers
from dashskip.core.kernels import host_description
from dashskip.data import load_text
from dashskip.eval.evaluation import perplexity_windows, window_nll
from dashskip.models.loading import ALIASES


def window_nlls(dm, windows: torch.Tensor, decider, activations: str, batch: int = 4) -> torch.Tensor:
    os.environ["DASHSKIP_ACTIVATIONS"] = activations  # read on every product: switches the arithmetic in place
    out = []
    for start in range(0, windows.shape[0], batch):
        out.extend(window_nll(dm.engine, windows[start : start + batch], decider, dm.costs)[0])
    return torch.tensor(out, dtype=torch.float64)


def ppl(nlls: torch.Tensor) -> str:
    mean = float(nlls.mean())
    return f"{math.exp(mean):.2f} ± {math.exp(mean) * float(nlls.std()) / math.sqrt(len(nlls)):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(ALIASES))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--speedup", type=float, default=2.0)
    args = parser.parse_args()
    dm = from_pretrained(args.model, speedup=args.speedup)
    windows = perplexity_windows(dm.tokenizer, load_text("wikitext2"), 256, args.windows)
    n = dm.backbone.num_layers
    configs = {"int8 on every inner layer": inner_layers(n, "int8"),
               "int4 on every inner layer": inner_layers(n, "int4"),
               f"dash {args.speedup:g}x": dm.decider_for(args.speedup)}  # fmt: skip
    print(f"host: {host_description()}; {args.model}, {windows.shape[0]} WikiText-2 windows of 256\n")
    print("| configuration | ppl, bf16 rows | ppl, int8 rows | NLL difference (int8 - bf16) ± paired SE |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        full = window_nlls(dm, windows, None, "int8")
        print(f"| full (no quantized state) | {ppl(full)} | {ppl(full)} | 0 |")
        for name, decider in configs.items():
            bf16, int8 = window_nlls(dm, windows, decider, "bf16"), window_nlls(dm, windows, decider, "int8")
            diff = int8 - bf16
            print(f"| {name} | {ppl(bf16)} | {ppl(int8)} | {float(diff.mean()):+.4f} ± "
                  f"{float(diff.std()) / math.sqrt(len(diff)):.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
