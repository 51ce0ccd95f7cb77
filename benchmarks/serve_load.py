"""Load on `dashskip serve` (loopback, a real model): N concurrent streaming requests, and a short request's wait
while a long prompt is being prefilled.

Prints one JSON line per measurement: latency p50/p95 over the concurrent streams, failures, whether every stream
ended with [DONE], and the scheduler's batching counters (/health); then the short request's time to first token
alone and behind a long prompt.

Usage: python benchmarks/serve_load.py [--model smollm2-135m] [--requests 50] [--tokens 8] [--long-prompt 4000]
"""

import argparse
import asyncio
import json
import statistics
import threading
import time

import httpx

from dashskip.api import from_pretrained
from dashskip.serve.scheduler import BatchLimits
from dashskip.serve.server import ServerLimits, create_app, listen, make_server


def start(model, limits: ServerLimits):
    app = create_app(model, "bench", limits)
    server = make_server(app, listen("127.0.0.1", 0), log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{server.port}"


async def stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, bool]:
    """(seconds to the first token, seconds to the end, ended with [DONE])."""
    t0 = time.perf_counter()
    first, done = None, False
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - t0
            done = done or line == "data: [DONE]"
    return first or 0.0, time.perf_counter() - t0, done


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


async def concurrent(url: str, requests: int, tokens: int) -> dict:
    body = {"model": "bench", "prompt": "The history of the city begins", "max_tokens": tokens, "temperature": 0}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=requests)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream(client, url, body) for _ in range(requests)), return_exceptions=True)
        wall = time.perf_counter() - t0
        health = (await client.get(f"{url}/health")).json()
    ok = [r for r in results if not isinstance(r, BaseException)]
    latencies = [r[1] for r in ok]
    return {
        "requests": requests, "tokens": tokens, "failures": requests - len(ok), "all_done": all(r[2] for r in ok),
        "p50_s": round(statistics.median(latencies), 2), "p95_s": round(percentile(latencies, 0.95), 2),
        "wall_s": round(wall, 2), "health": {k: health.get(k) for k in ("decode_steps", "mean_batch", "largest_batch")},
    }  # fmt: skip


async def behind_long_prompt(url: str, long_tokens: int) -> dict:
    short = {"model": "bench", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    long = {"model": "bench", "prompt": "word " * long_tokens, "max_tokens": 4, "temperature": 0}
    async with httpx.AsyncClient(timeout=600) as client:
        alone = (await stream(client, url, short))[0]
        task = asyncio.ensure_future(stream(client, url, long))
        await asyncio.sleep(0.2)  # the long prompt is being prefilled
        behind = (await stream(client, url, short))[0]
        long_first, _, _ = await task
    return {
        "long_prompt_tokens": long_tokens, "short_first_token_alone_s": round(alone, 3),
        "short_first_token_behind_long_s": round(behind, 3), "long_first_token_s": round(long_first, 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--speedup", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--long-prompt", type=int, default=4000)
    parser.add_argument("--max-batch", type=int, default=BatchLimits().max_batch)
    args = parser.parse_args()
    model = from_pretrained(args.model, speedup=args.speedup)
    limits = ServerLimits(max_tokens=64, max_prompt_tokens=args.long_prompt + 16,
                          batch=BatchLimits(max_batch=args.max_batch))  # fmt: skip
    server, thread, url = start(model, limits)
    try:
        print(json.dumps({"model": args.model, "max_batch": args.max_batch, **asyncio.run(concurrent(
            url, args.requests, args.tokens))}), flush=True)  # fmt: skip
        print(json.dumps(asyncio.run(behind_long_prompt(url, args.long_prompt))), flush=True)
    finally:
        server.stop()
        thread.join(30)


if __name__ == "__main__":
    main()
