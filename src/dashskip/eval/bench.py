"""Wall-clock benchmark: plain transformers `generate`, the engine's full path and a method, side by side.

Everything is timed in one process, one after the other, with the same prompts: medians over repetitions
after a warm-up. Decode time per step is (T(N new tokens) - T(1 new token)) / (N - 1), so prefill and the
first head call cancel out; prefill time is T(1 new token). The same formula serves all three, so the
ratios compare like with like.

It also states how close the full path is to the machine's limit: decode reads every weight once per step,
so bytes of weights per step / time per step, divided by the measured memory bandwidth, is the fraction of
the physical limit reached.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from dashskip.core import kernels
from dashskip.core.decisions import BatchMajority, Decider, TimedDecider, every_layer, inner_layers
from dashskip.core.states import State, codes, spec
from dashskip.errors import DashskipError
from dashskip.methods import MethodOptions, build_decider, check_method
from dashskip.runtime.generation import generate


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 7) -> float:
    """Read bandwidth of main memory in GB/s: the median time to sum a buffer far larger than any cache."""
    buffer = torch.ones(megabytes * 2**20 // 4)  # written once, so every page is really backed
    buffer.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - t0)
    return buffer.numel() * 4 / statistics.median(times) / 1e9


def layer_bytes(backbone) -> dict[int, list[int]]:
    """Per state, the weight bytes each layer reads in one decode step (a skipped layer: its K/V projections, the
    'project' rule)."""
    table: dict[int, list[int]] = {}
    for state in codes():
        table[state] = [
            layer.kv.nbytes(State.FULL)
            if spec(state).skips
            else sum(layer.linears()[name].nbytes(state) for name in ("qkv", "o", "gate_up", "down"))
            for layer in backbone.layers
        ]
    return table


def head_bytes(backbone) -> int:
    return backbone.head.handler_nbytes(backbone.heads[backbone.head_precision])


def bytes_per_step(backbone, states: torch.Tensor) -> float:
    """Mean weight bytes read per decode step for states (batch, steps, layers): rows share one read per state."""
    per_layer = layer_bytes(backbone)
    total = 0.0
    for step in range(states.shape[1]):
        for layer in range(states.shape[2]):
            for state in torch.unique(states[:, step, layer]).tolist():
                total += per_layer[int(state)][layer]
    return total / max(states.shape[1], 1) + head_bytes(backbone)


def quantized_extra_mb(backbone) -> float:
    """Memory the quantized forms and the kernels' packed layouts add to the model, in MB (they exist once used:
    a state never run costs nothing)."""
    return sum(linear.extra_bytes() for linear in [*backbone.linears(), backbone.head]) / 2**20


@dataclass
class Row:
    """One configuration's timings; times are medians in ms."""

    name: str
    prefill_ms: float
    decode_ms_per_step: float
    batch: int
    prompt_len: int
    compute_ratio: float = 1.0
    prefill_compute_ratio: float = 1.0
    speedup: float = 1.0  # decode wall clock against the full path, as the cost table predicts it
    policy_ms_per_step: float = 0.0
    weight_mb_per_step: float | None = None

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_len / (self.prefill_ms / 1000)

    @property
    def decode_tok_s(self) -> float:
        return self.batch / (self.decode_ms_per_step / 1000)

    def to_dict(self, bandwidth: float) -> dict[str, Any]:
        out = asdict(self)
        out.update(prefill_tok_s=round(self.prefill_tok_s, 1), decode_tok_s=round(self.decode_tok_s, 2))
        out["policy_share"] = round(self.policy_ms_per_step / self.decode_ms_per_step, 4)
        if self.weight_mb_per_step is not None:
            gbs = self.weight_mb_per_step * 2**20 / (self.decode_ms_per_step / 1000) / 1e9
            out.update(weight_read_gbs=round(gbs, 2), bandwidth_fraction=round(gbs / bandwidth, 3))
        return out


class TokenClock:
    """A streamer in transformers' protocol (`put` the prompt, then each step's new tokens; `end`) that notes when
    each `put` came: the first new token ends the prefill, the ones after it time decode steps."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def prefill_and_decode_ms(self) -> tuple[float, float]:
        if len(self.times) < 3:
            raise DashskipError("timing decode needs at least 2 new tokens (the first one ends the prefill)")
        first, last = self.times[1], self.times[-1]  # times[0]: the prompt
        return (first - self.start) * 1000, (last - first) * 1000 / (len(self.times) - 2)


def prefill_and_decode_ms(run: Callable[[int, TokenClock], Any], new_tokens: int, repeats: int) -> tuple[float, float]:
    """(prefill ms, decode ms per step), medians over `repeats` runs after a warm-up. `run(n, clock)` generates n
    tokens, putting the prompt and then each new token to `clock`; both numbers come from inside the same run (a
    difference of two runs' totals would carry the prefill's run-to-run noise into decode: with a 512-token prompt
    that was several ms per token)."""
    run(new_tokens, TokenClock())  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        clock = TokenClock()
        run(new_tokens, clock)
        first, each = clock.prefill_and_decode_ms()
        prefill.append(first)
        decode.append(each)
    return statistics.median(prefill), statistics.median(decode)


def time_transformers(model, ids: torch.Tensor, new_tokens: int, repeats: int) -> Row:
    mask = torch.ones_like(ids)

    def run(n: int, clock: TokenClock) -> None:
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)

    prefill, decode = prefill_and_decode_ms(run, new_tokens, repeats)
    return Row("transformers generate (full)", prefill, decode, *ids.shape)


def time_engine(name: str, dm, ids: torch.Tensor, decider: Decider | None, new_tokens: int, repeats: int) -> Row:
    """Time `generate` on the engine with `decider` (None: every layer in full)."""
    timed = TimedDecider(decider or Decider())

    def run(n: int, clock: TokenClock | None = None):
        return generate(dm.engine, ids, decider=timed, max_new_tokens=n, costs=dm.costs, streamer=clock)

    prefill, decode = prefill_and_decode_ms(run, new_tokens, repeats)
    timed.reset()
    out = run(new_tokens)
    prefill_states = dm.engine.step(ids, dm.engine.new_session(*ids.shape), timed).states
    return Row(
        name,
        prefill,
        decode,
        *ids.shape,
        compute_ratio=out.compute_ratio,
        prefill_compute_ratio=dm.costs.compute_ratio(prefill_states, "prefill"),
        speedup=out.speedup,
        policy_ms_per_step=timed.ms_per_step if decider is not None else 0.0,
        weight_mb_per_step=bytes_per_step(dm.backbone, out.states) / 2**20,
    )


def method_decider(
    dm, method: str, speedup: float, mode: str | None, data_dir=None, control: bool = True, quantized_outer=False
) -> Decider:
    """The registry's decider, except that int8 / int4 run every inner layer in that state (the kernels' speed,
    as docs/benchmarks.md measured it), not the sensitivity-chosen layers at `speedup`; with `quantized_outer`,
    the first and last layer too."""
    if method in ("int8", "int4"):
        n = dm.backbone.num_layers
        return every_layer(n, method) if quantized_outer else inner_layers(n, method)
    return build_decider(dm.method_context(data_dir), method, speedup, MethodOptions(mode=mode, control=control))


@dataclass
class BenchResult:
    config: dict[str, Any]
    bandwidth_gbs: float
    rows: list[Row] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    quantized_extra_mb: float = 0.0

    def ratios(self) -> dict[str, float]:
        hf, full, method = self.rows[0], self.rows[1], self.rows[-1]
        return {
            "decode_vs_engine_full": round(full.decode_ms_per_step / method.decode_ms_per_step, 3),
            "decode_vs_transformers": round(hf.decode_ms_per_step / method.decode_ms_per_step, 3),
            "prefill_vs_engine_full": round(full.prefill_ms / method.prefill_ms, 3),
            "prefill_vs_transformers": round(hf.prefill_ms / method.prefill_ms, 3),
            "engine_full_vs_transformers_decode": round(hf.decode_ms_per_step / full.decode_ms_per_step, 3),
            "requested": self.config["speedup"] if self.config["method"] not in ("int8", "int4") else None,
            "delivered_compute_ratio": round(method.compute_ratio, 3),
            "predicted_speedup": round(method.speedup, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "bandwidth_gbs": round(self.bandwidth_gbs, 2),
            "rows": [r.to_dict(self.bandwidth_gbs) for r in self.rows],
            "ratios": self.ratios(),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "quantized_extra_mb": round(self.quantized_extra_mb, 1),
        }

    def table(self) -> str:
        lines = [
            "| configuration | prefill tok/s | decode tok/s | ms/step | compute ratio | policy % | weights GB/s "
            "(% of limit) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            d = row.to_dict(self.bandwidth_gbs)
            bw = f"{d['weight_read_gbs']:.1f} ({d['bandwidth_fraction']:.0%})" if "weight_read_gbs" in d else "-"
            lines.append(
                f"| {row.name} | {d['prefill_tok_s']:.0f} | {d['decode_tok_s']:.2f} | {row.decode_ms_per_step:.1f} | "
                f"{row.compute_ratio:.2f} | {d['policy_share']:.1%} | {bw} |"
            )
        r = self.ratios()
        lines.append(
            f"\ndecode: {r['decode_vs_engine_full']:.2f}x the engine's full path, {r['decode_vs_transformers']:.2f}x "
            f"transformers generate; prefill: {r['prefill_vs_engine_full']:.2f}x / {r['prefill_vs_transformers']:.2f}x"
            f" (memory bandwidth {self.bandwidth_gbs:.1f} GB/s, peak RSS {self.peak_rss_mb:.0f} MB, INT8/INT4 copies "
            "and packed panels "
            f"{self.quantized_extra_mb:.0f} MB)"
        )
        if r["requested"] is not None:
            lines.append(
                f"requested {r['requested']:.2f}x: predicted {r['predicted_speedup']:.2f}x (cost table, at compute "
                f"ratio {r['delivered_compute_ratio']:.2f}), measured decode wall clock "
                f"{r['decode_vs_engine_full']:.2f}x the engine's full path"
            )
        return "\n".join(lines)


def check_bench_args(batch: int, prompt_len: int, new_tokens: int, repeats: int) -> None:
    if batch < 1 or prompt_len < 1:
        raise DashskipError(f"batch and prompt length must be >= 1, got {batch} and {prompt_len}")
    if new_tokens < 2:
        raise DashskipError(f"--new-tokens must be >= 2 (the first new token ends the prefill, decode is timed over "
                            f"the rest), got {new_tokens}")  # fmt: skip
    if repeats < 1:
        raise DashskipError(f"--repeats must be >= 1, got {repeats}")


def run_bench(
    name: str,
    method: str = "dash",
    speedup: float = 1.33,
    batch: int = 1,
    prompt_len: int = 64,
    new_tokens: int = 32,
    repeats: int = 5,
    mode: str | None = None,
    majority: bool = False,
    head: str = "full",
    policy=None,
    data_dir=None,
    progress: bool = True,
    control: bool = True,
    quantized_outer: bool = False,
    kv_cache_dtype: str = "float32",
) -> BenchResult:
    """Benchmark `method` on the model `name` against its full path and plain transformers `generate`."""
    from dashskip.api import from_pretrained
    from dashskip.data import load_text, token_windows

    check_bench_args(batch, prompt_len, new_tokens, repeats)
    check_method(method)
    if quantized_outer and method not in ("int8", "int4"):  # before the model loads and a speedup is resolved
        raise DashskipError(f"--quantized-outer applies to --method int8 or int4, not '{method}'; leave it out")
    dm = from_pretrained(name, speedup=speedup if method == "dash" else 1.0, policy=policy, head=head,
                         kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    reference = dm.model  # the engine reads the transformers model's weights and leaves the model as it was
    ids = token_windows(dm.tokenizer, load_text("wikitext2", data_dir), batch, prompt_len, seed=0)
    decider = method_decider(dm, method, speedup, mode, data_dir, control, quantized_outer)
    plan_ratio = decider.traits.plan_ratio  # a sublayer plan's ratio: the states cannot show it
    label = method if method in ("int8", "int4") else f"{method} {speedup:g}x"
    if quantized_outer:
        label += " every layer"
    if method == "dash":
        label += f" {mode or dm.policy.config.mode}"
    if majority:
        decider, label = BatchMajority(decider), f"{label}, batch-majority"
    config = dict(
        model=name, method=method, speedup=speedup, mode=mode, control=control, majority=majority,
        quantized_outer=quantized_outer, batch=batch,
        prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, head=head, kv_cache_dtype=kv_cache_dtype,
        threads=torch.get_num_threads(),
        small_row_kernel=kernels.extension() is not None,
    )  # fmt: skip
    result = BenchResult(config, memory_bandwidth_gbs())
    jobs = [
        lambda: time_transformers(reference, ids, new_tokens, repeats),
        lambda: time_engine(f"engine, full ({head} head)", dm, ids, None, new_tokens, repeats),
        lambda: time_engine(f"engine, {label} ({head} head)", dm, ids, decider, new_tokens, repeats),
    ]
    for job in tqdm(jobs, desc="benchmark", disable=not progress):
        with torch.inference_mode():
            result.rows.append(job())
    if plan_ratio is not None:
        result.rows[-1].compute_ratio = result.rows[-1].prefill_compute_ratio = plan_ratio
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.quantized_extra_mb = quantized_extra_mb(dm.backbone)
    return result
