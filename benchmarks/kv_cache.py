"""The 16-bit K/V cache against the fp32 one, in one process on one host: quality and decode speed.

Quality: paired ΔNLL (± SE over windows) of each --dtypes cache against float32, on the same --windows perplexity
windows of --context tokens, for the full path and INT8 / INT4 on every inner layer (with --head). Speed: decode
tok/s of the same schedules at each --prompt-len, medians of --rounds rounds x --repeats (every configuration
timed once per round, so a shared host's noise falls on all alike). DASHSKIP_SMALL_GEMM=0 runs torch's ops.

Usage: python benchmarks/kv_cache.py [--model smollm2-135m] [--data wikitext2] [--windows 40] [--context 512]
       [--head int8] [--prompt-len 512 2000] [--rounds 3] [--repeats 2] [--dtypes float16 bfloat16]
"""

import argparse

import numpy as np
import torch

from dashskip.api import from_pretrained
from dashskip.core.cache import KVCacheDtype
from dashskip.core.decisions import inner_layers
from dashskip.core.kernels import host_description
from dashskip.data import load_text, token_windows
from dashskip.eval.bench import time_engine
from dashskip.eval.evaluation import perplexity, perplexity_windows
from dashskip.models.loading import ALIASES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(ALIASES))
    parser.add_argument("--data", default="wikitext2",
                        help="quality rows' text: wikitext2, wikitext2-valid or a file (PTB test: its path)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--head", default="int8", choices=["full", "bf16", "int8"])
    parser.add_argument("--prompt-len", type=int, nargs="*", default=[512, 2000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"])
    args = parser.parse_args()
    dm = from_pretrained(args.model)
    dm.set_head(args.head)
    n = dm.backbone.num_layers
    schedules = {"full": None, "int8": inner_layers(n, "int8"), "int4": inner_layers(n, "int4")}
    dtypes = ["float32", *args.dtypes]
    print(f"{args.model}, {host_description()}, {args.head} head\n")
    if args.windows:
        windows = perplexity_windows(dm.tokenizer, load_text(args.data), args.context, args.windows)
        print(f"paired ΔNLL against the float32 cache, {windows.shape[0]} {args.data} windows of {args.context}\n")
        print("| schedule | float32 ppl | " + " | ".join(args.dtypes) + " |\n|---|---|" + "---|" * len(args.dtypes))
        for name, decider in schedules.items():
            nll = {}
            for dtype in dtypes:
                dm.engine.kv_cache_dtype = KVCacheDtype(dtype)
                result = perplexity(dm.engine, windows, decider, dm.costs, progress=False)
                nll[dtype] = (torch.tensor(result.window_nlls, dtype=torch.float64), result.ppl)
            cells = []
            for dtype in args.dtypes:
                diff = nll[dtype][0] - nll["float32"][0]
                cells.append(f"{float(diff.mean()):+.5f} ± {float(diff.std() / len(diff) ** 0.5):.5f}")
            print(f"| {name} | {nll['float32'][1]:.3f} | " + " | ".join(cells) + " |", flush=True)
    for prompt_len in args.prompt_len:
        ids = token_windows(dm.tokenizer, load_text("wikitext2"), 1, prompt_len, seed=0)
        speeds: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for dtype in dtypes:
                dm.engine.kv_cache_dtype = KVCacheDtype(dtype)
                for name, decider in schedules.items():
                    with torch.inference_mode():
                        row = time_engine(name, dm, ids, decider, 32, args.repeats)
                    speeds.setdefault((name, dtype), []).append(row.decode_tok_s)
        print(f"\ndecode tok/s at {prompt_len} tokens of context, median [range] of {args.rounds} rounds\n")
        print("| schedule | " + " | ".join(dtypes) + " |\n|---|" + "---|" * len(dtypes))
        for name in schedules:
            cells = [speeds[name, d] for d in dtypes]
            print(f"| {name} | " + " | ".join(f"{np.median(c):.1f} [{min(c):.0f}-{max(c):.0f}]" for c in cells) + " |")


if __name__ == "__main__":
    main()
