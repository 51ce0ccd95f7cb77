"""Serving throughput: vLLM stock vs vLLM + DASH (the dashskip plugin) vs dashskip's own server, one run.

Each server is started as a user would (`dashskip serve --engine vllm` builds the vLLM command), on the same
host and cores, and gets the same WikiText-2 prompts (128 tokens) at 1, 8 and 32 concurrent requests, 64 new
tokens each (greedy). Reported per row: output tokens/s over the wall clock of the whole wave, p50 / p95 latency of
one request, and for DASH the compute ratio each request ran at (from the plugin's per-request log line).

Run in the vLLM environment (README, "Serving with vLLM"):
    python benchmarks/vllm_serving.py --out docs/vllm-serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dashskip.data import load_text, token_windows
from dashskip.models.loading import load_model, resolve
from dashskip.vllm import serve_command

ENGINES = ("vllm-stock", "vllm-dash", "vllm-dash-majority", "dashskip", "dashskip-majority")
RATIO_LINE = re.compile(r"after (\d+) tokens at compute ratio ([0-9.]+) \(asked ([0-9.]+)\)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process, its log, and its base URL; ready when /v1/models answers."""

    def __init__(self, command: list[str], port: int, env: dict[str, str]) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        # its own process group: vLLM's engine-core process goes with it
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"

    def wait(self, timeout: float = 300) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: see {self.log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout} s: see {self.log.name}")

    def ratios(self) -> list[tuple[float, float]]:
        """(asked, delivered) per request the DASH plugin reported."""
        text = Path(self.log.name).read_text(errors="replace")
        return [(float(m[3]), float(m[2])) for m in RATIO_LINE.finditer(text)]

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


async def wave(url: str, bodies: list[dict]) -> tuple[float, list[float], int]:
    """All requests at once: wall seconds, per-request latencies, completion tokens."""
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(body: dict) -> tuple[float, int]:
            start = time.perf_counter()
            r = await client.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start, [r[0] for r in results], sum(r[1] for r in results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(server: Server, name: str, prompts: list[str], levels: list[int], extra: dict, tokens: int) -> list[dict]:
    rows = []
    for level in levels:
        bodies = [{"model": name, "prompt": prompts[i % len(prompts)], "max_tokens": tokens, "temperature": 0,
                   **extra} for i in range(max(level, 4))]  # fmt: skip
        asyncio.run(wave(server.url, bodies[:2]))  # warm: kernels chosen, caches made
        walls, lats, total = [], [], 0
        for start in range(0, len(bodies), level):
            wall, latencies, count = asyncio.run(wave(server.url, bodies[start : start + level]))
            walls.append(wall)
            lats += latencies
            total += count
        rows.append({"concurrency": level, "requests": len(bodies), "tokens_per_s": total / sum(walls),
                     "p50_s": statistics.median(lats), "p95_s": percentile(lats, 0.95)})  # fmt: skip
        print(json.dumps({"server": name, **extra, **rows[-1]}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.33, 2.0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    folder = resolve(args.model)
    _, tokenizer = load_model(args.model)
    windows = token_windows(tokenizer, load_text("wikitext2"), 32, 128, seed=11)
    prompts = [tokenizer.decode(w) for w in windows]
    cores = f"0-{args.threads - 1}"
    # vLLM's CPU backend binds its compute threads and by default keeps a core for its front end; here every row
    # gets the same cores.
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "OMP_NUM_THREADS": str(args.threads)}  # fmt: skip
    top = max(args.levels)
    results: dict[str, object] = {"host": os.uname().nodename, "threads": args.threads, "tokens": args.tokens}
    rows = []
    for engine in args.engines:
        port = free_port()
        if engine.startswith("dashskip"):
            command = [str(Path(sys.executable).parent / "dashskip"), "serve", "--model", args.model, "--port",
                       str(port), "--max-batch", str(top)]  # fmt: skip
            if engine == "dashskip-majority":
                command += ["--batch-states", "majority"]
        else:
            states = "majority" if engine == "vllm-dash-majority" else "token"
            command = serve_command(folder, 1.0, None, True, "127.0.0.1", port, args.model, top, 512, 1 << 30, states)
            if engine == "vllm-stock":
                at = command.index("--hf-overrides")
                del command[at : at + 2]
        server = Server(command, port, env)
        try:
            startup = server.wait()
            points = [1.0] + (args.speedups if engine != "vllm-stock" else [])
            for speedup in points:
                if engine == "vllm-stock":
                    extra: dict = {}
                elif engine.startswith("vllm-dash"):
                    extra = {"ignore_eos": True, "vllm_xargs": {"dash_speedup": speedup}}
                else:
                    extra = {"speedup": speedup}
                if engine == "vllm-stock":
                    extra["ignore_eos"] = True
                for row in measure(server, args.model, prompts, args.levels, extra, args.tokens):
                    rows.append({"engine": engine, "speedup": speedup, "startup_s": startup, **row})
            if engine.startswith("vllm-dash"):
                results[f"{engine}_ratios"] = server.ratios()
        finally:
            server.stop()
    results["rows"] = rows
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(f"{'engine':<11} {'speedup':>7} {'conc':>4} {'tok/s':>7} {'p50 s':>6} {'p95 s':>6}")
    for r in rows:
        print(f"{r['engine']:<11} {r['speedup']:>7.2f} {r['concurrency']:>4} {r['tokens_per_s']:>7.1f} "
              f"{r['p50_s']:>6.2f} {r['p95_s']:>6.2f}")  # fmt: skip
    for engine in [e for e in args.engines if e.startswith("vllm-dash")]:
        ratios = results[f"{engine}_ratios"]
        for asked in sorted({a for a, _ in ratios}):
            got = [d for a, d in ratios if a == asked]
            print(f"{engine} asked {asked:.2f}: delivered median {statistics.median(got):.3f} "
                  f"[{min(got):.3f}-{max(got):.3f}] over {len(got)} requests")  # fmt: skip


if __name__ == "__main__":
    main()
