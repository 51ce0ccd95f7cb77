"""Static INT8 on the k most similar inner layers (rest full): the plain-quantization comparator for DASH.

Usage: python benchmarks/int8_static.py   (needs out/smollm2-calibration.json from `dashskip calibrate`)
"""

import json

from dashskip.api import from_pretrained
from dashskip.calibration import Calibration
from dashskip.data import load_text
from dashskip.decisions import FixedStates
from dashskip.evaluation import perplexity, perplexity_windows


def main() -> None:
    dm = from_pretrained("smollm2-135m", speedup=1.67)
    w = perplexity_windows(dm.tokenizer, load_text("wikitext2"), 256, 40)
    cal = Calibration.load("out/smollm2-calibration.json")
    inner = sorted(range(1, 29), key=lambda i: cal.cosine[i], reverse=True)
    for k in (28, 23, 13, 7):
        states = [4] * 30
        for i in inner[:k]:
            states[i] = 2
        r = perplexity(dm.engine, w, FixedStates(states), dm.costs, progress=False)
        print(
            json.dumps(
                {"int8_layers": k, "ppl": round(r.ppl, 2), "se": round(r.ppl_se, 2), "ratio": round(r.compute_ratio, 3)}
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
