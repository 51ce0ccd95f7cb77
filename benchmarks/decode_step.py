"""Decode step time with each decoder layer as one compiled call vs the same ops called one by one from Python.

Both run the same kernels (the ones measured fastest on this host), so their outputs are equal; what differs is the
Python between ops. SmolLM2 (or --model), batch 1, a 20-token prompt, then --tokens greedy steps (engine step plus
head), median ms per step over --repeats runs, the two paths interleaved run by run; full layers with the full
head, INT8 / INT4 on every inner layer with the INT8 head.

Usage: python benchmarks/decode_step.py [--model smollm2-135m] [--tokens 32] [--repeats 5]
"""

import argparse
import statistics
import time

import dashskip
from dashskip.core.decisions import FixedStates
from dashskip.core.kernels import host_description
from dashskip.models.layer import DecoderLayer

PROMPT = "The history of the city begins in the third century BC, when a tribe of fishermen settled on an island"


def ms_per_step(dm, decider: FixedStates, tokens: int) -> float:
    ids = dm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    session = dm.engine.new_session(1, ids.shape[1] + tokens + 1)
    token = dm.backbone.logits(dm.engine.step(ids, session, decider).hidden[:, -1:]).argmax(-1)
    times = []
    for _ in range(tokens):
        start = time.perf_counter()
        token = dm.backbone.logits(dm.engine.step(token, session, decider).hidden[:, -1:]).argmax(-1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dm = dashskip.from_pretrained(args.model)
    n = dm.config.num_hidden_layers
    one_call = DecoderLayer._fused
    print(f"host: {host_description()}; {args.model}, batch 1, median ms per decode step\n")
    print("| configuration | one call per layer | ops one by one | ratio |\n|---|---|---|---|")
    for name, state, head in (("full", 4, "full"), ("int8", 2, "int8"), ("int4", 1, "int8")):
        dm.backbone.set_head(head)
        decider = FixedStates([4] + [state] * (n - 2) + [4])
        ms: dict[bool, list[float]] = {True: [], False: []}
        for repeat in range(args.repeats + 1):  # the first round warms up (kernel choice, packing)
            for fused in (True, False):
                DecoderLayer._fused = one_call if fused else (lambda self, state, x: None)
                value = ms_per_step(dm, decider, args.tokens)
                if repeat:
                    ms[fused].append(value)
        DecoderLayer._fused = one_call
        on, off = statistics.median(ms[True]), statistics.median(ms[False])
        print(f"| {name} ({head} head) | {on:.2f} | {off:.2f} | {off / on:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
