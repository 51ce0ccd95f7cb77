"""Whether a request's decisions depend on what it is batched with: a decode step of many rows scores them in one
batched product (`GreedyScorer` with a table row per row), a row alone in the compiled one-row kernel. On real
hidden states (WikiText-2 windows through the full model, the shipped policy), count the decisions where the two
differ, at the policy's
bias for a speedup and at biases spread around it (requests at different operating points).

    python benchmarks/batched_decisions.py --rows 32 --speedup 1.5
"""

from __future__ import annotations

import argparse

import torch

from dashskip import Decider
from dashskip.api import bundled_policy, from_pretrained
from dashskip.core.states import State
from dashskip.data import load_text, token_windows

FULL = int(State.FULL)


class Grab(Decider):
    """Every layer in full; keeps each layer's input of the decode step."""

    def __init__(self) -> None:
        self.hidden: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, hidden: torch.Tensor, previous: int) -> int:
        if hidden.shape[1] == 1:
            self.hidden[layer] = hidden.clone()
        return FULL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--speedup", type=float, default=1.5)
    args = parser.parse_args()
    model = from_pretrained(args.model, policy=bundled_policy(args.model))
    ids = token_windows(model.tokenizer, load_text("wikitext2"), args.rows, 64)
    session, grab = model.engine.new_session(args.rows, capacity=80), Grab()
    model.engine.step(ids, session, grab)
    model.engine.step(ids[:, -1:], session, grab)
    decider = model.decider_for(args.speedup)  # resolved and biased on this host's table
    scorer, base = decider.greedy, decider.bias
    total = differ = 0
    for bias in (torch.full((args.rows,), base), torch.linspace(base * 0.5, base * 1.5, args.rows)):
        for layer in range(1, model.backbone.num_layers - 2):
            hidden = grab.hidden[layer]
            batched = torch.as_tensor(scorer(hidden, layer, FULL, scorer.table(bias))).reshape(-1)
            for r in range(args.rows):
                alone = scorer(hidden[r : r + 1], layer, FULL, scorer.table(bias[r]))
                alone = int(torch.as_tensor(alone).reshape(-1)[0])
                total += 1
                differ += alone != int(batched[r])
    print(f"{args.rows} rows at {args.speedup}x: {differ} of {total} decisions differ batched vs alone "
          f"({differ / total:.4%})")  # fmt: skip


if __name__ == "__main__":
    main()
