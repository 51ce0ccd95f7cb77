"""dashskip against llama.cpp, the engine a CPU user would pick instead, in one process on one host.

Rows: transformers `generate`, the engine's full path, INT8 on every inner layer, DASH at each --speedup (rate
control on), and llama.cpp (`llama-cpp-python`) on the GGUF the alias ships (SmolLM2: Q4_1). Every row decodes
the same WikiText-2 prompt greedily; prefill = the prompt plus the first token, decode = ms per further token,
medians over --repeats, threads = torch's (llama.cpp is given the same number). llama.cpp's AMX buffer type
crashed on these hosts, so it runs with `use_extra_bufts=False`.

Needs `pip install llama-cpp-python==0.3.36` (builds from source in a few minutes; not a dashskip dependency).

Usage: python benchmarks/vs_llamacpp.py [--model smollm2-135m] [--speedups 1.67 2.0] [--prompt-len 64]
       [--new-tokens 32] [--repeats 5]
"""

import argparse
import json

import numpy as np
import torch

from dashskip.api import from_pretrained
from dashskip.core.decisions import inner_layers
from dashskip.core.kernels import host_description
from dashskip.data import load_text, token_windows
from dashskip.eval.bench import Row, prefill_and_decode_ms, time_engine, time_transformers
from dashskip.models.loading import ALIASES


def load_llama_cpp(gguf: str, context: int, threads: int):
    """`Llama` with the model parameter `use_extra_bufts` off (its constructor has no argument for it)."""
    import llama_cpp.llama as wrapper

    native = wrapper.llama_cpp
    default = native.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    native.llama_model_default_params = without_extra_buffers
    try:
        return wrapper.Llama(model_path=gguf, n_ctx=context, n_threads=threads, n_threads_batch=threads,
                             n_batch=context, verbose=False)  # fmt: skip
    finally:
        native.llama_model_default_params = default


def llama_cpp_row(gguf: str, ids: list[int], new_tokens: int, repeats: int, threads: int) -> Row:
    llm = load_llama_cpp(gguf, len(ids) + new_tokens + 8, threads)

    def run(n: int) -> list[int]:
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            if len(out) < n:
                llm.eval([token])
        return out

    prefill, decode = prefill_and_decode_ms(run, new_tokens, repeats)
    return Row(f"llama.cpp {gguf.rsplit('.', 2)[-2]} (use_extra_bufts=False)", prefill, decode, 1, len(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(ALIASES))
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.67, 2.0])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dm = from_pretrained(args.model, speedup=min(args.speedups))
    ids = token_windows(dm.tokenizer, load_text("wikitext2"), 1, args.prompt_len, seed=0)
    n, threads = dm.backbone.num_layers, torch.get_num_threads()
    with torch.inference_mode():
        rows = [
            time_transformers(dm.model, ids, args.new_tokens, args.repeats),
            time_engine("engine, full", dm, ids, None, args.new_tokens, args.repeats),
            time_engine("engine, int8 inner layers", dm, ids, inner_layers(n, "int8"), args.new_tokens, args.repeats),
            *(time_engine(f"engine, dash {s:g}x", dm, ids, dm.decider_for(s), args.new_tokens, args.repeats)
              for s in args.speedups),
        ]  # fmt: skip
    rows.append(llama_cpp_row(str(ALIASES[args.model].gguf_path()), ids[0].tolist(), args.new_tokens, args.repeats,
                              threads))  # fmt: skip
    print(f"host: {host_description()}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, medians of {args.repeats}\n")  # fmt: skip
    print("| configuration | prefill tok/s | decode tok/s | ms/token | compute ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.name} | {row.prefill_tok_s:.0f} | {row.decode_tok_s:.1f} | {row.decode_ms_per_step:.1f} | "
              f"{row.compute_ratio:.2f} |")  # fmt: skip
    best = max(rows[1:-1], key=lambda r: r.decode_tok_s)
    ratio = rows[-1].decode_tok_s / best.decode_tok_s
    print(f"\nllama.cpp decodes {ratio:.2f}x the fastest dashskip row ({best.name})")
    print(json.dumps({r.name: {"prefill_tok_s": round(r.prefill_tok_s, 1), "decode_tok_s": round(r.decode_tok_s, 2)}
                      for r in rows}))  # fmt: skip


if __name__ == "__main__":
    main()
