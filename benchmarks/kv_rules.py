"""Perplexity when a random fraction of (token, layer) pairs skip, under each K/V rule for skipped tokens.

Usage: python benchmarks/kv_rules.py --calibration out/smollm2-calibration.json [--limit 8]
"""

import argparse
import json

import torch

from dashskip.api import from_pretrained
from dashskip.core.decisions import Decider
from dashskip.data import load_text
from dashskip.eval.evaluation import perplexity, perplexity_windows


class RandomTokenSkip(Decider):
    """Each (token, layer) pair skips with probability p, from a fixed seed."""

    def __init__(self, p: float, seed: int = 0) -> None:
        self.p = p
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, layer, hidden, previous):
        return torch.where(torch.rand(hidden.shape[:-1], generator=self.generator) < self.p, 0, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--limit", type=int, default=8)
    args = parser.parse_args()
    for rule in ("copy", "project"):
        dm = from_pretrained(args.model, calibration=args.calibration, kv_rule=rule)
        windows = perplexity_windows(dm.tokenizer, load_text("wikitext2"), 256, args.limit)
        if rule == "copy":
            full = perplexity(dm.engine, windows, None, progress=False)
            print(json.dumps({"rule": "full", "ppl": round(full.ppl, 2), "windows": full.windows}))
        for p in (0.05, 0.1):
            r = perplexity(dm.engine, windows, RandomTokenSkip(p), progress=False)
            print(json.dumps({"rule": rule, "skip": p, "ppl": round(r.ppl, 2), "se": round(r.ppl_se, 2)}), flush=True)


if __name__ == "__main__":
    main()
