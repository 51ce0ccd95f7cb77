"""Does a requested operating point hold on text unlike the calibration text? Requested vs reported compute ratio
of greedy generation over varied prompts (chat, code, held-out prose from PTB and LAMBADA, XSum documents), with
the rate controller on and off (off: the paper's fixed calibrated bias).

Usage: python benchmarks/operating_points.py [--model smollm2-135m] [--speedups 1.33 1.67 2.0] [--tokens 48]
"""

import argparse
import json
import statistics

import torch

from dashskip.api import from_pretrained
from dashskip.data import find_data_file, load_summaries, read_jsonl
from dashskip.models.chat import chat_input_ids

CODE = '''def merge_intervals(intervals):
    """Merge overlapping [start, end] intervals."""
    intervals.sort(key=lambda x: x[0])
    merged = []
    for start, end in intervals:
'''
CHATS = [
    "Give me three tips for a job interview.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short poem about the sea.",
]


def prompts(tokenizer, per_kind: int) -> list[tuple[str, list[int]]]:
    """(kind, token ids) for every prompt, each >= 32 tokens where the source allows."""
    out = [("chat", chat_input_ids(tokenizer, [{"role": "user", "content": c}])) for c in CHATS[:per_kind]]
    out.append(("code", tokenizer(CODE)["input_ids"]))
    ptb = find_data_file("ptb/ptb.test.txt").read_text().split("\n")
    for k in range(per_kind):
        out.append(("ptb", tokenizer(" ".join(ptb[40 * k : 40 * k + 4]))["input_ids"][:96]))
    for k, record in enumerate(read_jsonl(find_data_file("lambada/lambada_test.jsonl"))):
        if k >= per_kind:
            break
        out.append(("lambada", tokenizer(record["text"])["input_ids"][:96]))
    for item in load_summaries("xsum")[:per_kind]:
        out.append(("xsum", tokenizer(item.document)["input_ids"][:160]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.33, 1.67, 2.0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--per-kind", type=int, default=3)
    args = parser.parse_args()
    dm = from_pretrained(args.model, speedup=min(args.speedups))  # loads the shipped policy
    cases = prompts(dm.tokenizer, args.per_kind)
    for speedup in args.speedups:
        for control in (False, True):
            errors, rows = [], []
            for kind, ids in cases:
                decider = dm.policy.decider(speedup, control=control)
                out = dm.generate(torch.tensor([ids]), max_new_tokens=args.tokens, decider=decider,
                                  eos_token_id=[], return_dict_in_generate=True)  # fmt: skip
                errors.append(out.compute_ratio / speedup - 1)
                rows.append((kind, round(out.compute_ratio, 3)))
            print(json.dumps({
                "speedup": speedup, "control": control, "prompts": len(cases), "tokens": args.tokens,
                "mean_abs_error": round(statistics.mean(abs(e) for e in errors), 4),
                "max_abs_error": round(max(abs(e) for e in errors), 4),
                "within_3pct": sum(abs(e) <= 0.03 for e in errors), "ratios": rows,
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
