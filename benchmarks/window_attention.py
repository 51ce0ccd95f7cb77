"""Decode past a sliding window: the compiled attention with the window (what runs) against torch's attention on
the windowed layers (what ran before the compiled kernel took a window, and what still runs where it cannot:
padding inside a row, no extension), in one process, rounds interleaved.

Gemma-3's local layers see the last 512 keys. A prompt longer than that puts every decode step past the window.
The torch path is forced by hiding the step's row starts from the windowed layers once the cache is longer than
their window (and keeping the whole-step call off, as it was then). Before timing, the full path's greedy tokens
are compared between the two (they must agree: the kernels differ only in summation order).

Usage: python benchmarks/window_attention.py [--model gemma3-270m] [--prompt-len 1000] [--head int8] [--rounds 3]
       [--repeats 2]
"""

import argparse
import contextlib

import numpy as np
import torch

from dashskip.api import from_pretrained
from dashskip.core.cache import KVCacheDtype
from dashskip.core.decisions import inner_layers
from dashskip.core.kernels import host_description
from dashskip.data import load_text, token_windows
from dashskip.eval.bench import time_engine
from dashskip.models.layer import DecoderLayer
from dashskip.models.loading import ALIASES
from dashskip.runtime.engine import Engine
from dashskip.runtime.generation import generate


@contextlib.contextmanager
def torch_attention_past_the_window():
    """Windowed layers run torch's attention once the cache outgrows their window; the whole-step call is off."""
    layer_call, run_planned = DecoderLayer.__call__, Engine._run_planned

    def call(self, rows, x, step, *args, **kwargs):
        if not (self.window and step.cache.end > self.window and step.key_begins is not None):
            return layer_call(self, rows, x, step, *args, **kwargs)
        begins, step.key_begins = step.key_begins, None
        try:
            return layer_call(self, rows, x, step, *args, **kwargs)
        finally:
            step.key_begins = begins

    def planned(self, states, x, step):
        if any(w and step.cache.end > w for w in self.backbone.windows):
            return None
        return run_planned(self, states, x, step)

    DecoderLayer.__call__, Engine._run_planned = call, planned
    try:
        yield
    finally:
        DecoderLayer.__call__, Engine._run_planned = layer_call, run_planned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m", choices=sorted(ALIASES))
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--head", default="int8", choices=["full", "bf16", "int8"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    dm = from_pretrained(args.model)
    dm.set_head(args.head)
    n = dm.backbone.num_layers
    windows = sorted({w for w in dm.backbone.windows if w is not None})
    if not windows or args.prompt_len <= windows[0]:
        parser.error(f"{args.model} has sliding windows {windows or 'none'}; give a --prompt-len past one")
    ids = token_windows(dm.tokenizer, load_text("wikitext2"), 1, args.prompt_len, seed=0)
    paths = {"torch": torch_attention_past_the_window, "compiled": contextlib.nullcontext}
    tokens = {}
    for path, context in paths.items():
        with context():
            tokens[path] = generate(dm.engine, ids, max_new_tokens=24).sequences
    print(f"{args.model}, {host_description()}, {args.head} head, {args.prompt_len} tokens of context "
          f"(windows {windows}); full path's 24 greedy tokens equal on both paths: "
          f"{torch.equal(tokens['torch'], tokens['compiled'])}\n")  # fmt: skip
    schedules = {"full": None, "int8": inner_layers(n, "int8")}
    speeds: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.rounds):
        for dtype in ("float32", "float16"):
            dm.engine.kv_cache_dtype = KVCacheDtype(dtype)
            for name, decider in schedules.items():
                for path, context in paths.items():
                    with context(), torch.inference_mode():
                        row = time_engine(name, dm, ids, decider, 32, args.repeats)
                    speeds.setdefault((name, dtype, path), []).append(row.decode_tok_s)
    print(f"decode tok/s, median [range] of {args.rounds} rounds x {args.repeats}\n")
    print("| schedule | K/V cache | torch's attention on windowed layers | compiled, windowed | ratio |")
    print("|---|---|---|---|---|")
    for name in schedules:
        for dtype in ("float32", "float16"):
            old, new = speeds[name, dtype, "torch"], speeds[name, dtype, "compiled"]
            print(f"| {name} | {dtype} | {np.median(old):.1f} [{min(old):.0f}-{max(old):.0f}] | {np.median(new):.1f} "
                  f"[{min(new):.0f}-{max(new):.0f}] | {np.median(new) / np.median(old):.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
