"""What per-row states cost a batched decode step: every layer full, every inner layer INT8, a share of each layer's
rows full and the rest INT8, and the shipped policy at an operating point (each row its own decider, as the server
runs them).

--batches sessions of WikiText-2 prompts (--prompt tokens each) prefilled in one step, then --tokens greedy steps
(engine step, head, argmax); median ms per step over the steps after the first four. The model is loaded on a
short-lived thread and the steps run on another, as `dashskip serve` runs them (serve/scheduler.py says why);
--load-on-main loads it on the main thread instead, as `dashskip serve` did before, to measure what that costs.

Usage: python benchmarks/batched_states.py [--model smollm2-135m] [--batches 8 32] [--speedup 1.33] [--full-share 0.14]
       [--load-on-main]
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import dashskip
from dashskip.api import bundled_policy
from dashskip.core.decisions import Decider, TokenStates, inner_layers, per_row
from dashskip.core.kernels import host_description
from dashskip.core.states import State
from dashskip.data import load_text, token_windows
from dashskip.serve.scheduler import off_the_main_thread


def share_full(share: float) -> TokenStates:
    """A `share` of each layer's rows full (a different set per layer), the others INT8."""

    def states(layer: int, positions: torch.Tensor) -> torch.Tensor:
        rows = positions.shape[0]
        chosen = torch.full(positions.shape, int(State.INT8), dtype=torch.long)
        chosen[(torch.arange(rows) + layer) % rows < round(share * rows)] = int(State.FULL)
        return chosen

    return TokenStates(states)


def ms_per_step(dm, prompts: torch.Tensor, decider: Decider, tokens: int) -> tuple[float, list[int]]:
    engine = dm.engine
    session = engine.new_session(prompts.shape[0], prompts.shape[1] + tokens + 1)
    result = engine.step(prompts, session, decider)
    token = dm.backbone.logits(result.hidden[:, -1]).argmax(-1)
    times = []
    for _ in range(tokens):
        start = time.perf_counter()
        result = engine.step(token[:, None], session, decider)
        token = dm.backbone.logits(result.hidden[:, -1]).argmax(-1)
        times.append(time.perf_counter() - start)
    counts = torch.bincount(result.states.flatten().long(), minlength=max(State) + 1).tolist()
    return statistics.median(times[4:]) * 1000, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=14)
    parser.add_argument("--speedup", type=float, default=1.33)
    parser.add_argument("--full-share", type=float, default=0.14)
    parser.add_argument("--load-on-main", action="store_true", help="load the model on the main thread")
    args = parser.parse_args()

    def load() -> dashskip.DashModel:
        return dashskip.from_pretrained(args.model, policy=bundled_policy(args.model))

    dm = load() if args.load_on_main else off_the_main_thread(load)
    layers = dm.backbone.num_layers
    windows = token_windows(dm.tokenizer, load_text("wikitext2"), max(args.batches), args.prompt, seed=1)
    point = dm.operating_point(args.speedup)
    kinds: dict[str, Callable[[int], Decider]] = {
        "full": lambda batch: Decider(),
        "int8": lambda batch: inner_layers(layers, "int8"),
        f"{args.full_share:.0%} full": lambda batch: share_full(args.full_share),
        f"dash {args.speedup}x": lambda batch: per_row([dm.decider_for(point) for _ in range(batch)]),
    }

    def run() -> None:
        loaded = "the main thread" if args.load_on_main else "a thread of its own"
        print(f"{args.model}, {host_description()}, loaded on {loaded}; median ms per decode step (state counts of "
              "the last step)")
        for batch in args.batches:
            for name, make in kinds.items():
                ms, counts = ms_per_step(dm, windows[:batch], make(batch), args.tokens)
                named = {s.name: counts[s] for s in State if counts[s]}
                print(f"batch {batch:>3}  {name:>12}  {ms:7.1f} ms  {named}", flush=True)

    off_the_main_thread(run)


if __name__ == "__main__":
    main()
