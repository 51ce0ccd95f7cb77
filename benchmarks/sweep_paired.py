"""A method (default DASH) minus another (default INT8) per task and operating point, paired over the same examples.

Reads a `dashskip sweep` output folder (results.json and the per-example cache under examples/).
Usage: python benchmarks/sweep_paired.py out/sweep-smollm2 [--method dash] [--against int8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dashskip.eval.tasks import PRIMARY, _choice_correct, paired_difference


def scores(folder: Path, task: str) -> list[float]:
    lines = (folder / f"{task}.jsonl").read_text().splitlines()[1:]  # after the signature header
    rows = sorted((json.loads(line) for line in lines), key=lambda r: r["index"])
    if task == "wikitext2":
        return [r["nll"] for r in rows]
    if PRIMARY.get(task, "").startswith("rouge"):
        return [r["rougeL"] for r in rows]
    return _choice_correct(rows, normalised=PRIMARY.get(task) != "acc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--method", default="dash")
    parser.add_argument("--against", default="int8")
    args = parser.parse_args()
    data = json.loads((args.out / "results.json").read_text())
    root = args.out / "examples" / data["meta"]["fingerprint"]
    for cell in data["cells"]:
        if cell["method"] != args.method or cell["unreachable"]:
            continue
        if args.method == "dash":  # its folder names the policy and the request
            ours = next(
                p for p in root.iterdir() if p.name.startswith("dash-") and p.name.endswith(f"{cell['request']:.4f}")
            )
        else:
            ours = root / f"{args.method}-{cell['target']}-seed0"
        other = root / f"{args.against}-{cell['target']}-seed0"
        if not (other / f"{cell['task']}.jsonl").exists():
            continue
        a, b = scores(ours, cell["task"]), scores(other, cell["task"])
        mean, se = paired_difference(a, b)
        unit = "NLL" if cell["task"] == "wikitext2" else cell["metric"]
        print(
            f"{cell['target']}x {cell['task']:10s} {args.method} - {args.against} = {mean:+.4f} ± {se:.4f} "
            f"({unit}, n={len(a)})"
        )


if __name__ == "__main__":
    main()
