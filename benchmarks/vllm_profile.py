"""Where a DASH decode step goes inside vLLM: stock vs the plugin in this process, then a cProfile of the plugin.

vLLM's engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one compute thread as vLLM binds it), one
engine at a time: N requests of 64 greedy tokens, timed after a warm-up wave; then the same wave under cProfile,
printing dashskip's and vLLM's heaviest calls. Run in the vLLM environment (README, "Serving with vLLM"):
    python benchmarks/vllm_profile.py --requests 32 --speedup 2.0
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    from vllm import LLM, SamplingParams

    from dashskip.models.loading import resolve
    from dashskip.vllm import hf_overrides

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--batch-states", default="token")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    folder = resolve(args.model)
    prompts = [f"Story number {i}: once upon a time there was a" for i in range(args.requests)]
    engine = dict(model=folder, dtype="float32", max_model_len=512, enforce_eager=True, kv_cache_memory_bytes=1 << 30,
                  enable_prefix_caching=False)  # fmt: skip
    dash = hf_overrides("LlamaForCausalLM", args.speedup, batch_states=args.batch_states)
    for name, overrides in (("vLLM stock", {}), (f"vLLM + DASH {args.speedup}x {args.batch_states}", dash)):
        llm = LLM(hf_overrides=overrides, **engine)
        params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        print(f"{name}: {args.requests} x {args.tokens} tokens in {seconds:.2f} s, "
              f"{args.requests * args.tokens / seconds:.1f} tok/s", flush=True)  # fmt: skip
        if overrides:
            profile = cProfile.Profile()
            profile.enable()
            llm.generate(prompts, params, use_tqdm=False)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(20)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


if __name__ == "__main__":
    main()
