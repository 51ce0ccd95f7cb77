"""Train a policy on a tiny model: run by test_training.py in a subprocess that it may kill."""

import sys

import torch

from dashskip import Backbone, Engine
from dashskip.core.costs import CostTable
from dashskip.methods.dash.training import TrainConfig, train
from tests.conftest import tiny_model

if __name__ == "__main__":
    out, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    engine = Engine(Backbone(tiny_model("llama")), scales=torch.full((6,), 1.05))
    corpus = torch.randint(3, 97, (4000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(
        steps=steps, batch_size=2, seq_len=16, checkpoint_every=5, heldout_windows=4, heldout_len=16, targets=(1.5,)
    )
    train(engine, corpus, CostTable.default(), cfg, out, {"fingerprint": "tiny"}, progress=False)
