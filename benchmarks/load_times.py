"""First (GGUF -> safetensors) and cached load time of each embedded alias, in a fresh cache folder.

The fresh folder (`DASHSKIP_CACHE`, ~2 GB for both aliases) is removed afterwards unless --keep-cache is given.

Usage: python benchmarks/load_times.py [--keep-cache]
"""

import argparse
import os
import shutil
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep-cache", action="store_true", help="leave the fresh cache folder in place")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="dashskip-load-")
    os.environ["DASHSKIP_CACHE"] = cache
    from dashskip.models.loading import ALIASES, load_model

    try:
        print("| alias | first load (s) | cached load (s) |\n|---|---|---|")
        for name in ALIASES:
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                load_model(name)
                times.append(time.perf_counter() - t0)
            print(f"| {name} | {times[0]:.1f} | {times[1]:.1f} |", flush=True)
    finally:
        if args.keep_cache:
            print(f"cache kept in {cache}")
        else:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
