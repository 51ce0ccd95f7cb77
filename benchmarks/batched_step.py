"""Batched decode step time (every layer full, fp32 head) with and without oneDNN's product among the kernel choices.

What a serving engine's decode step costs at the batch sizes it runs: --batches sessions of WikiText-2 prompts
(--prompt tokens each) prefilled, then --tokens greedy steps (engine step, head, argmax), median ms per step. The
two kernel sets alternate run by run (--repeats), each with its own measured choice per shape and row bucket
(cached like every choice); "without" is the kernel set of the commit before oneDNN's product was a candidate.

Usage: python benchmarks/batched_step.py [--model smollm2-135m] [--batches 1 8 16 32] [--tokens 16] [--repeats 3]
"""

import argparse
import statistics
import time

import torch

import dashskip
from dashskip.core import kernels
from dashskip.core.kernels import host_description
from dashskip.data import load_text, token_windows


def ms_per_step(dm, prompts: torch.Tensor, tokens: int) -> float:
    engine = dm.engine
    session = engine.new_session(prompts.shape[0], prompts.shape[1] + tokens + 1)
    token = dm.backbone.logits(engine.step(prompts, session).hidden[:, -1]).argmax(-1)
    times = []
    for _ in range(tokens):
        start = time.perf_counter()
        token = dm.backbone.logits(engine.step(token[:, None], session).hidden[:, -1]).argmax(-1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dm = dashskip.from_pretrained(args.model)
    windows = token_windows(dm.tokenizer, load_text("wikitext2"), max(args.batches), args.prompt, seed=1)
    with_onednn = kernels.onednn
    print(f"{args.model}, {host_description()}; median ms per decode step, {args.repeats} runs of {args.tokens}")
    print(f"{'batch':>5} {'without':>8} {'with oneDNN':>12} {'ratio':>6}")
    for batch in args.batches:
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for allowed in (False, True):
                kernels.onednn = with_onednn if allowed else (lambda: False)
                kernels.CHOICE.forget()  # choices back from disk; the one-call layers rebuilt with them
                runs[allowed].append(ms_per_step(dm, windows[:batch], args.tokens))
        kernels.onednn = with_onednn
        without, with_ = statistics.median(runs[False]), statistics.median(runs[True])
        print(f"{batch:>5} {without:>8.1f} {with_:>12.1f} {without / with_:>5.2f}x")


if __name__ == "__main__":
    main()
