"""DASH minus another method (default INT8) per task and operating point, paired over the same examples.

Reads a `dashskip sweep` output folder (results.json and the per-example cache under examples/).
Usage: python benchmarks/sweep_paired.py out/sweep-smollm2 [--against int8]
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
    parser.add_argument("--against", default="int8")
    args = parser.parse_args()
    data = json.loads((args.out / "results.json").read_text())
    root = args.out / "examples" / data["meta"]["fingerprint"]
    for cell in data["cells"]:
        if cell["method"] != "dash" or cell["unreachable"]:
            continue
        dash = next(
            p for p in root.iterdir() if p.name.startswith("dash-") and p.name.endswith(f"{cell['request']:.4f}")
        )
        other = root / f"{args.against}-{cell['target']}-seed0"
        if not (other / f"{cell['task']}.jsonl").exists():
            continue
        a, b = scores(dash, cell["task"]), scores(other, cell["task"])
        mean, se = paired_difference(a, b)
        unit = "NLL" if cell["task"] == "wikitext2" else cell["metric"]
        print(
            f"{cell['target']}x {cell['task']:10s} dash - {args.against} = {mean:+.4f} ± {se:.4f} ({unit}, n={len(a)})"
        )


if __name__ == "__main__":
    main()
