"""Markdown tables of a model's calibration (cosine, scale per layer) and measured per-state cost and error.

Usage: python benchmarks/foundation_report.py --calibration CAL.json --profile PROFILE.json
(`dashskip calibrate` writes the first; `dashskip profile --json` prints where it wrote the second.)
"""

import argparse
import json
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--profile", required=True)
    args = parser.parse_args()
    with open(args.calibration) as fh:
        cal = json.load(fh)
    with open(args.profile) as fh:
        prof = json.load(fh)
    meta = cal["meta"]
    print(f"Calibration: {meta['samples']} x {meta['seq_len']} tokens of {meta.get('data')}\n")
    print("| layer | cos(X, Y) | scale ‖Y‖/‖X‖ | attn cos | MLP cos |\n|---|---|---|---|---|")
    columns = zip(cal["cosine"], cal["scales"], cal["attn_cosine"], cal["mlp_cosine"], strict=True)
    for i, (c, s, a, m) in enumerate(columns):
        print(f"| {i} | {c:.3f} | {s:.3f} | {a:.3f} | {m:.3f} |")
    print(
        f"\nPer-state cost on {prof['machine']} (mean over inner layers; decode = 1 token after 128 cached, "
        "prefill = 256 tokens) and error on real hidden states (relative to the full layer):\n"
    )
    print("| state | decode ms/layer | decode cost | prefill ms/layer | prefill cost | output error | update error |")
    print("|---|---|---|---|---|---|---|")
    for name, s in (("skip (scale·x, K/V projected)", "0"), ("INT4 (group 64)", "1"), ("INT8", "2"), ("full", "4")):
        dms = statistics.mean(prof["layer_ms"]["decode"][s])
        pms = statistics.mean(prof["layer_ms"]["prefill"][s])
        out = statistics.mean(prof["errors"]["output"][s]) if s in prof["errors"].get("output", {}) else 0.0
        upd = statistics.mean(prof["errors"]["update"][s]) if s in prof["errors"].get("update", {}) else 0.0
        print(
            f"| {name} | {dms:.3f} | {prof['decode'][s]:.3f} | {pms:.2f} | {prof['prefill'][s]:.3f} | "
            f"{out:.4f} | {upd:.4f} |"
        )


if __name__ == "__main__":
    main()
