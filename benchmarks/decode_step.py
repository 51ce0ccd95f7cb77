"""Decode step time with the whole step's layers as one compiled call, each decoder layer as one compiled call, and
the same ops called one by one from Python.

All three run the same kernels (the ones measured fastest on this host), so their outputs are equal; what differs is
the Python between layers and between ops. SmolLM2 (or --model), batch 1, a 20-token prompt, then --tokens greedy
steps (engine step plus head), median ms per step over --repeats runs, the three paths interleaved run by run; full
layers with the full head, INT8 / INT4 on every inner layer with the INT8 head.

Usage: python benchmarks/decode_step.py [--model smollm2-135m] [--tokens 32] [--repeats 5]
"""

import argparse
import statistics
import time

import dashskip
from dashskip.core.decisions import FixedStates, Wrapper
from dashskip.core.kernels import host_description
from dashskip.models.layer import DecoderLayer

PROMPT = "The history of the city begins in the third century BC, when a tribe of fishermen settled on an island"


class LayerByLayer(Wrapper):
    """The same fixed states, asked layer by layer (a decider that answers per layer has no plan for the step)."""

    def __call__(self, layer, hidden, previous):
        return self.decider(layer, hidden, previous)


def ms_per_step(dm, decider, tokens: int) -> float:
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
    one_call = DecoderLayer.one_call
    print(f"host: {host_description()}; {args.model}, batch 1, median ms per decode step\n")
    print("| configuration | whole step, one call | one call per layer | ops one by one | per layer / whole |")
    print("|---|---|---|---|---|")
    paths = ("whole", "layer", "ops")
    for name, state, head in (("full", 4, "full"), ("int8", 2, "int8"), ("int4", 1, "int8")):
        dm.backbone.set_head(head)
        decider = FixedStates([4] + [state] * (n - 2) + [4])
        ms: dict[str, list[float]] = {p: [] for p in paths}
        for repeat in range(args.repeats + 1):  # the first round warms up (kernel choice, packing)
            for path in paths:
                DecoderLayer.one_call = one_call if path != "ops" else (lambda self, state, x: None)
                value = ms_per_step(dm, decider if path == "whole" else LayerByLayer(decider), args.tokens)
                if repeat:
                    ms[path].append(value)
        DecoderLayer.one_call = one_call
        whole, layer, ops = (statistics.median(ms[p]) for p in paths)
        print(f"| {name} ({head} head) | {whole:.2f} | {layer:.2f} | {ops:.2f} | {layer / whole:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
