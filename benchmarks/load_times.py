"""First (GGUF -> safetensors) and cached load time of each embedded alias, in a fresh cache folder.

Usage: python benchmarks/load_times.py
"""

import os
import tempfile
import time


def main() -> None:
    os.environ["DASHSKIP_CACHE"] = tempfile.mkdtemp(prefix="dashskip-load-")
    from dashskip.models.loading import ALIASES, load_model

    print("| alias | first load (s) | cached load (s) |\n|---|---|---|")
    for name in ALIASES:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            load_model(name)
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {times[0]:.1f} | {times[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
