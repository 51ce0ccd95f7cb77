"""The `dashskip` command line: one entry point, a subcommand per job. Commands parse and print; the work is done by
the library functions they call, so everything here is also a Python call away."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from dashskip.api import bundled_policy, from_pretrained
from dashskip.core.cache import KVCacheDtype
from dashskip.errors import DashskipError
from dashskip.eval.tasks import TASKS
from dashskip.methods import METHODS
from dashskip.models.loading import ALIASES, DEFAULT_MODEL

app = typer.Typer(
    help="DASH layer skipping for Hugging Face decoder LLMs. Run `dashskip COMMAND --help` for examples.",
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: no box drawing, no type labels on flags
)

METHOD_HELP = "; ".join(f"{m.name} ({m.summary})" for m in METHODS.values())
ModelOpt = Annotated[str, typer.Option("--model", "-m", help=f"alias ({', '.join(ALIASES)}), model folder or hub id")]
ControlOpt = Annotated[
    str,
    typer.Option(help="rate control: on steers each sequence to --speedup; off keeps the policy's calibrated bias"),
]

KVCacheDtypeOpt = Annotated[
    str,
    typer.Option(help="what the K/V cache stores: float32, or float16 / bfloat16 (half the bytes each decode step "
                 "reads; perplexity unchanged within noise on both models, docs/speed.md)"),
]


def _control(value: str) -> bool:
    if value not in ("on", "off"):
        raise DashskipError(f"--control takes on or off, got '{value}'")
    return value == "on"


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt text")],
    model: ModelOpt = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
    speedup: Annotated[float, typer.Option(help="operating point; 1.0 = every layer in full")] = 1.0,
    policy: Annotated[Path | None, typer.Option(help="policy file (default: the one shipped for the alias)")] = None,
    mode: Annotated[str | None, typer.Option(help="decision mode: async (default of the policy) or sync")] = None,
    control: ControlOpt = "on",
    calibration: Annotated[Path | None, typer.Option(help="calibration file (skip scales, without a policy)")] = None,
    kv_rule: Annotated[str | None, typer.Option(help="K/V of skipped tokens: copy or project")] = None,
    kv_cache_dtype: KVCacheDtypeOpt = "float32",
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the tokenizer's chat template")] = False,
    sample: Annotated[bool, typer.Option(help="sample instead of greedy decoding")] = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    lossless: Annotated[
        bool, typer.Option(help="draft with a cheap path (--draft), verify with the full model: its exact output")
    ] = False,
    draft_tokens: Annotated[int, typer.Option(help="lossless: most tokens drafted per round")] = 4,
    draft: Annotated[
        str | None,
        typer.Option(
            help="lossless drafter: dash (the DASH path at --speedup, its full layers in INT8), int8 or int4 "
            "(every inner layer; int8 is the fastest on CPUs); default: dash with --speedup above 1, else int8"
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object: text and per-token statistics")
    ] = False,
) -> None:
    """Generate text, streaming tokens as they come.

    Example: dashskip generate "The capital of France is" --max-new-tokens 20

    Lossless (the full model's exact output, drafted by DASH): dashskip generate "Once upon" --speedup 1.2 --lossless

    Lossless, fastest on CPUs (INT8 drafts): dashskip generate "Once upon" --lossless --draft int8
    """
    if not prompt.strip():
        raise DashskipError("empty prompt: give some text to continue")
    if lossless and draft == "dash" and speedup <= 1.0:
        raise DashskipError("--draft dash drafts with the DASH path: add --speedup 1.5 (any value above 1), or use "
                            "--draft int8")  # fmt: skip
    t0 = time.perf_counter()
    dm = from_pretrained(model, speedup=speedup, policy=policy, calibration=calibration, kv_rule=kv_rule, mode=mode,
                         control=_control(control), kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    load_s = time.perf_counter() - t0
    tok = dm.tokenizer
    if chat:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    streamer = None
    if not as_json:
        from transformers import TextStreamer

        streamer = TextStreamer(tok, skip_prompt=chat, skip_special_tokens=True)
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    out = dm.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
        streamer=streamer,
        return_dict_in_generate=True,
        generator=generator,
        lossless=lossless,
        draft_tokens=draft_tokens,
        draft=draft,
    )
    seconds = time.perf_counter() - t0
    new = out.sequences[0, ids.shape[1] :]
    if as_json:
        stats = out.stats()
        stats.update(
            speedup=speedup,
            mode=getattr(dm.decider, "mode", None),
            new_tokens=int(new.numel()),
            seconds=round(seconds, 3),
            load_seconds=round(load_s, 2),
            tokens_per_second=round(new.numel() / seconds, 2),
            cost_table=dm.costs.provenance(),
            operating_point=dm.point.as_dict(),
            **({"lossless": out.speculative.as_dict()} if lossless else {}),
        )
        print(
            json.dumps(
                {"model": model, "prompt": prompt, "text": tok.decode(new, skip_special_tokens=True), "stats": stats}
            )
        )
    else:
        typer.echo(
            f"\n[{new.numel()} tokens, {new.numel() / seconds:.1f} tok/s, decode {out.speedup:.2f}x the full path "
            f"(cost table), compute ratio {out.compute_ratio:.2f}]",
            err=True,
        )


@app.command()
def calibrate(
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[str, typer.Option(help="data set name (wikitext2) or a text file")] = "wikitext2",
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the shared data sets")] = None,
    samples: Annotated[int, typer.Option(help="calibration sequences (the paper uses 128)")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 256,
    seed: int = 0,
    out: Annotated[Path, typer.Option(help="where to write the calibration JSON")] = Path("calibration.json"),
    plot: Annotated[Path | None, typer.Option(help="also write a PNG of cosine similarity and scale per layer")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Compute per-layer skip scales and input/output cosine similarity (paper eq. 7).

    Example: dashskip calibrate --model smollm2-135m --data wikitext2 --samples 128 --out calib.json --plot calib.png
    """
    from dashskip.data import load_text, token_windows
    from dashskip.measure.calibration import calibrate as run_calibration
    from dashskip.models.loading import fingerprint, load_model

    hf, tok = load_model(model)
    windows = token_windows(tok, load_text(data, data_dir), samples, seq_len, seed)
    t0 = time.perf_counter()
    result = run_calibration(hf, windows, fingerprint(hf), meta={"model": model, "data": data, "seed": seed})
    result.meta["seconds"] = round(time.perf_counter() - t0, 1)
    result.save(out)
    if plot:
        result.plot(plot, title=f"{model}: layer similarity and scale ({data}, {samples}x{seq_len} tokens)")
    if as_json:
        print(json.dumps({"out": str(out), "scales": result.scales, "cosine": result.cosine}))
        return
    typer.echo(f"layer  cosine  scale   attn-cos  mlp-cos   ({result.meta['tokens']} tokens)")
    for i in range(result.num_layers):
        typer.echo(
            f"{i:5d}  {result.cosine[i]:6.3f}  {result.scales[i]:6.3f}  {result.attn_cosine[i]:8.3f}  "
            f"{result.mlp_cosine[i]:7.3f}"
        )
    typer.echo(f"wrote {out}" + (f" and {plot}" if plot else ""))


@app.command()
def profile(
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[Path | None, typer.Option(help="cost table path (default: the cache, used automatically)")] = None,
    repeats: Annotated[int, typer.Option(help="timed repetitions per (layer, state); the median is kept")] = 5,
    context: Annotated[int, typer.Option(help="cached tokens behind the decode token")] = 128,
    prefill_tokens: Annotated[int, typer.Option(help="tokens in the prefill block")] = 256,
    layers: Annotated[
        str | None, typer.Option(help="comma-separated layer indices (default: all inner layers)")
    ] = None,
    errors: Annotated[bool, typer.Option(help="also measure each state's output error on real hidden states")] = True,
    data: Annotated[str, typer.Option(help="text for the error measurement")] = "wikitext2",
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the shared data sets")] = None,
    error_tokens: Annotated[int, typer.Option(help="tokens of real text for the error measurement")] = 256,
    calibration: Annotated[Path | None, typer.Option(help="calibration file (skip scales for the skip error)")] = None,
    kv_rule: Annotated[str, typer.Option(help="K/V rule whose skip cost is measured: project or copy")] = "project",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Measure each state's per-layer time (decode and prefill) and error, and store the cost table.

    Example: dashskip profile --model smollm2-135m --repeats 5 --calibration calib.json
    """
    from dashskip.core.kernels import CHOICE, host_description
    from dashskip.core.states import registered
    from dashskip.data import load_text, token_windows
    from dashskip.measure.profiling import default_profile_path, measure_beyond_layers, state_errors
    from dashskip.measure.profiling import profile as run_profile
    from dashskip.methods.dash.policy import DashPolicy

    dm = from_pretrained(model, calibration=calibration, kv_rule=kv_rule)
    try:
        chosen = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise DashskipError(f"--layers must be comma-separated integers, got '{layers}'") from None
    table = run_profile(dm.engine, dm.fingerprint, context, prefill_tokens, repeats, chosen)
    for head in dm.backbone.heads:  # what a decode token costs beyond its layers with each head precision
        measure_beyond_layers(dm.engine, table, head, context=context)
    shipped = bundled_policy(model)
    if shipped is not None:  # and what the shipped policy's decisions cost
        policy = DashPolicy.load(shipped)
        measure_beyond_layers(dm.engine, table, "full", policy.decider(1.0, control=False), policy.decision_key,
                              context=context)  # fmt: skip
    if errors:
        ids = token_windows(dm.tokenizer, load_text(data, data_dir), 1, error_tokens, seed=0)
        table.errors = state_errors(dm.engine, ids)
    path = out or default_profile_path(dm.fingerprint, str(dm.engine.kv_rule))
    table.save(path)
    if as_json:
        kernels = [{"key": k, "kernel": c, "ms": ms} for k, c, ms in CHOICE.table()]
        print(json.dumps({"out": str(path), "decode": table.decode, "prefill": table.prefill, "errors": table.errors,
                          "outside": table.outside, "decisions": table.decisions, "kernels": kernels}))  # fmt: skip
        return
    typer.echo("state  decode-cost  prefill-cost  decode-ms/layer  prefill-ms/layer  output-error  update-error")
    for state in registered():
        s = state.code
        dms = statistics.mean(table.layer_ms["decode"][str(s)])
        pms = statistics.mean(table.layer_ms["prefill"][str(s)])
        err = table.errors.get("output", {}).get(str(s))
        upd = table.errors.get("update", {}).get(str(s))
        errs = f"{statistics.mean(err):12.4f}  {statistics.mean(upd):12.4f}" if err else f"{0:12.4f}  {0:12.4f}"
        typer.echo(
            f"{state.name:5s}  {table.decode[s]:11.3f}  {table.prefill[s]:12.3f}  {dms:15.3f}  {pms:16.2f}  {errs}"
        )
    beyond = ", ".join(f"{head} head {cost:.2f}" for head, cost in table.outside.items())
    decided = "".join(f"; {key} decisions {cost:.2f}" for key, cost in table.decisions.items())
    typer.echo(f"per decode token beyond the layers, in full layers: {beyond}{decided}")
    typer.echo(f"wrote {path} (errors: mean over layers 1..L-2, relative to the full layer's output / update)")
    typer.echo(f"\nkernels chosen on this host ({host_description()}), measured at first use (ms per call):")
    for key, kernel, ms in CHOICE.table():
        typer.echo(f"  {key:48s} {kernel:8s} " + "  ".join(f"{k} {v:.3f}" for k, v in sorted(ms.items())))


@app.command()
def train(
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[
        str, typer.Option(help="wikitext2 (its validation split), a text file, or arc-easy / arc-challenge")
    ] = "wikitext2",
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the shared data sets")] = None,
    speedup: Annotated[list[float] | None, typer.Option(help="operating point(s) to calibrate, repeatable")] = None,
    out: Annotated[Path, typer.Option(help="run folder: checkpoints, train_log.jsonl, policy.safetensors")] = Path(
        "dash-run"
    ),
    calibration: Annotated[
        Path | None, typer.Option(help="calibration file; computed into the run folder if absent")
    ] = None,
    steps: int = 200,
    batch_size: int = 4,
    seq_len: int = 128,
    lr: float = 5e-4,
    beta: Annotated[float, typer.Option(help="initial efficiency reward weight")] = 0.02,
    efficiency: Annotated[
        str, typer.Option(help="efficiency reward: 'bits' (4 - s, METHOD.md) or 'measured' (this machine's costs)")
    ] = "bits",
    states: Annotated[
        str | None,
        typer.Option(help="states the policy may choose, by name or code, e.g. skip,int8,full or 0,2,4 to leave "
                     "INT4 out (full is required); default: all four"),
    ] = None,
    ratio_target: Annotated[
        float, typer.Option(help="compute ratio the sampled paths are held at (0: fixed beta)")
    ] = 1.5,
    ratio_ramp: Annotated[
        float, typer.Option(help="fraction of the steps over which the ratio target rises from 1.0 (0: none)")
    ] = 0.0,
    eps: Annotated[float, typer.Option(help="tolerated relative perplexity change per token")] = 2.0,
    reward: Annotated[
        str,
        typer.Option(help="accuracy reward on text: 'label' (perplexity of the next token, METHOD.md eq. 13) or "
                     "'fidelity' (the same ratio over the full model's predicted distribution, exp(KL))"),
    ] = "label",
    tau0: float = 1.0,
    tau_decay: float = 0.005,
    mode: Annotated[str, typer.Option(help="decision mode the policy is trained in: async or sync")] = "async",
    kv_rule: Annotated[str, typer.Option(help="K/V rule for skipped tokens: project or copy")] = "project",
    checkpoint_every: int = 20,
    heldout_windows: Annotated[int, typer.Option(help="held-out windows for the operating points")] = 12,
    heldout_len: Annotated[int, typer.Option(help="tokens per held-out window")] = 256,
    max_ppl_loss: Annotated[
        float | None,
        typer.Option(help="held-out perplexity an operating point may lose against the full model (0.05 = 5%); "
                     "the policy's range ends below the first ratio that loses more"),
    ] = None,
    seed: int = 0,
) -> None:
    """Train a DASH policy by policy gradient; re-running the same command resumes from the last checkpoint.

    Example: dashskip train --model smollm2-135m --data wikitext2 --speedup 1.33 --speedup 1.67 --speedup 2.0
    """
    from dashskip.methods.dash.training import DEFAULT_TARGETS, TrainConfig, train_job

    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        beta=beta,
        efficiency=efficiency,
        policy={} if states is None else {"allowed": _parse_states(states)},
        ratio_target=ratio_target or None,
        ratio_ramp=ratio_ramp,
        eps=eps,
        reward=reward,
        tau0=tau0,
        tau_decay=tau_decay,
        seed=seed,
        checkpoint_every=checkpoint_every,
        kv_rule=kv_rule,
        mode=mode,
        heldout_windows=heldout_windows,
        max_ppl_loss=max_ppl_loss,
        heldout_len=heldout_len,
        targets=tuple(sorted(set(speedup or DEFAULT_TARGETS))),
    )
    policy = train_job(model, out, cfg, data, data_dir, calibration)
    typer.echo(
        f"wrote {out / 'policy.safetensors'}; operating points (held-out compute ratio): "
        f"{policy.meta['operating_point_ratios']}"
    )


@app.command("train-rl-adapter")
def train_rl_adapter(
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="run folder: checkpoint, train_log.jsonl, rl_adapter.safetensors")] = Path(
        "rl-adapter-run"
    ),
    data: Annotated[str, typer.Option(help="training text: a named corpus or a text file")] = "wikitext2-valid",
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the shared data sets")] = None,
    windows: Annotated[int, typer.Option(help="training windows drawn from the first 90% of the text")] = 1000,
    seq_len: int = 128,
    heldout_windows: Annotated[int, typer.Option(help="windows from the last 10% for the thresholds")] = 8,
    heldout_len: int = 256,
    init_steps: int = 50,
    pretrain_steps: int = 150,
    rl_steps: int = 300,
    batch_size: int = 4,
    bottleneck: int = 64,
    skip_prob: float = 0.3,
    lam: Annotated[float, typer.Option(help="reward lost per inner layer run")] = 0.05,
    kv_rule: Annotated[str, typer.Option(help="project (as DASH) or copy (the paper's)")] = "project",
    speedup: Annotated[list[float] | None, typer.Option(help="operating point(s), repeatable")] = None,
    seed: int = 0,
) -> None:
    """Train the RL-adapter baseline (docs/rl_adapter.md); the same command again resumes from its checkpoint.

    Example: dashskip train-rl-adapter --model smollm2-135m --out runs/rl-adapter
    """
    from dashskip.methods.rl_adapter import RLAdapterConfig, run_rl_adapter

    defaults = RLAdapterConfig()
    cfg = RLAdapterConfig(
        bottleneck=bottleneck, batch_size=batch_size, seed=seed, kv_rule=kv_rule, init_steps=init_steps,
        pretrain_steps=pretrain_steps, skip_prob=skip_prob, rl_steps=rl_steps, lam=lam,
        heldout_windows=heldout_windows, targets=tuple(sorted(set(speedup or defaults.targets))),
    )  # fmt: skip
    adapter = run_rl_adapter(model, out, cfg, data, data_dir, windows, seq_len, heldout_len)
    typer.echo(
        f"wrote {out / 'rl_adapter.safetensors'}; operating points (held-out compute ratio): "
        f"{adapter.meta['operating_point_ratios']}"
    )


def _parse_states(text: str) -> tuple[str, ...]:
    from dashskip.core.states import parse, spec

    return tuple(spec(parse(part)).name for part in _csv(text, "states"))


@app.command("eval")
def evaluate(
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help=f"one of: {METHOD_HELP}")] = "dash",
    speedup: float = 1.67,
    policy: Annotated[Path | None, typer.Option(help="policy file (default: the one shipped for the alias)")] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="calibration file for static/adaskip/skipdecode/random (default: cached one)")
    ] = None,
    decisions: Annotated[str | None, typer.Option("--mode", help="dash decision mode: async or sync")] = None,
    control: ControlOpt = "on",
    task: Annotated[
        str,
        typer.Option(
            help=f"perplexity (the default, on --data) or one of {', '.join(t for t in TASKS if t != 'wikitext2')}"
        ),
    ] = "perplexity",
    data: Annotated[str, typer.Option(help="perplexity text: wikitext2 (test split) or a file")] = "wikitext2",
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the shared data sets")] = None,
    context: Annotated[int, typer.Option(help="tokens per window (stride = context, no overlap)")] = 256,
    limit: Annotated[int | None, typer.Option(help="score only the first N windows / examples")] = None,
    cache: Annotated[
        Path | None, typer.Option(help="per-example results file (.jsonl): an interrupted --task run resumes from it")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Perplexity, or a task's accuracy / ROUGE, with standard errors and the measured compute ratio.

    Example: dashskip eval --model smollm2-135m --method dash --speedup 1.67 --limit 40

    A task: dashskip eval --method int8 --speedup 2.0 --task arc-easy --limit 200
    """
    from dashskip.eval.run import evaluate as run_eval

    if method == "rl-adapter":
        raise DashskipError("evaluate the rl-adapter method with `dashskip sweep --methods rl-adapter --rl-adapter F`")
    row = run_eval(model, method, speedup, task, policy, calibration, decisions, data, data_dir, context, limit, cache,
                   _control(control))  # fmt: skip
    if as_json:
        print(json.dumps(row))
        return
    if task == "perplexity":
        typer.echo(
            f"{method} @ {row['requested_speedup']}x: ppl {row['ppl']:.3f} ± {row['ppl_se']:.3f} (SE, "
            f"{row['windows']} windows x {context} tokens), compute ratio {row['compute_ratio']:.3f}"
        )
        return
    scores = ", ".join(
        f"{name} {m['value']:.4f} ± {m['se']:.4f}" for name, m in row["metrics"].items() if name != "nll"
    )  # fmt: skip
    typer.echo(
        f"{method} on {task}: {scores} (SE, {row['examples']} examples), compute ratio {row['compute_ratio']:.3f}"
    )


def _csv(text: str, name: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise DashskipError(f"--{name} is empty; give a comma-separated list")
    return items


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(t) for t in _csv(text, name)]
    except ValueError:
        raise DashskipError(f"--{name} '{text}': give comma-separated numbers, e.g. 1.33,1.67,2.0") from None


@app.command()
def sweep(
    model: ModelOpt = DEFAULT_MODEL,
    methods: Annotated[
        str,
        typer.Option(help=f"comma-separated, the full model is always run: {METHOD_HELP}"),
    ] = "dash,static,int8,mixed,early-exit,skipdecode,adaskip,random",
    speedups: Annotated[str, typer.Option(help="requested compute ratios")] = "1.33,1.67,2.0",
    tasks: Annotated[
        str, typer.Option(help=f"comma-separated: {', '.join(TASKS)}")
    ] = "wikitext2,arc-easy,hellaswag,mmlu,xsum",
    limit: Annotated[
        str | None, typer.Option(help="examples per task: N for all, or task=N pairs (defaults: wikitext2=40, ...)")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="output folder: table.md, results.json/csv, plots, per-example cache")
    ] = Path("sweep"),
    policy: Annotated[
        Path | None, typer.Option(help="DASH policy file (default: the one shipped for the alias)")
    ] = None,
    variant: Annotated[
        list[str] | None, typer.Option(help="extra DASH policy as LABEL=FILE, repeatable (the ablation's rows)")
    ] = None,
    rl_adapter: Annotated[
        Path | None, typer.Option(help="adapters of the rl-adapter method (dashskip train-rl-adapter)")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="DASH decision mode: async or sync")] = None,
    match: Annotated[
        bool, typer.Option(help="correct DASH's request once so its measured ratio on WikiText-2 meets the target")
    ] = True,
    plots: Annotated[bool, typer.Option(help="write pareto.png and state_map.png")] = True,
    seed: Annotated[int, typer.Option(help="seed of the random baseline")] = 0,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the shared data sets")] = None,
) -> None:
    """Quality and measured speedup of every method at every operating point, on every task, in one table.

    Re-running the same command resumes from the per-example cache in --out.

    Example: dashskip sweep --model smollm2-135m --methods dash,static,int8 --speedups 1.33,1.67,2.0 \\
    --tasks wikitext2,arc-easy --limit wikitext2=40,arc-easy=200 --out sweep-smollm2
    """
    from dashskip.eval.sweep import Sweep, SweepSpec, parse_limits

    variants = {}
    for item in variant or []:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise DashskipError(f"--variant '{item}': write LABEL=FILE, e.g. --variant no-int4=run/policy.safetensors")
        variants[label] = path
    spec = SweepSpec(
        model=model,
        methods=_csv(methods, "methods"),
        speedups=_floats(speedups, "speedups"),
        tasks=_csv(tasks, "tasks"),
        limits=parse_limits(limit),
        out=out,
        policy=str(policy) if policy else None,
        variants=variants,
        rl_adapter=str(rl_adapter) if rl_adapter else None,
        mode=mode,
        seed=seed,
        match=match,
        data_dir=str(data_dir) if data_dir else None,
        plots=plots,
    )
    Sweep(spec).run()
    typer.echo((out / "table.md").read_text())
    typer.echo(f"wrote {out}/table.md, results.json, results.csv" + (", pareto.png, state_map.png" if plots else ""))


@app.command()
def bench(
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="dash, int8 or int4 (every inner layer in that state)")] = "dash",
    speedup: Annotated[float, typer.Option(help="operating point of the dash method (decode wall clock)")] = 1.2,
    batch: Annotated[int, typer.Option(help="rows decoded together")] = 1,
    prompt_len: Annotated[int, typer.Option(help="prompt tokens per row (WikiText-2 test windows)")] = 64,
    new_tokens: Annotated[int, typer.Option(help="tokens generated per row")] = 32,
    repeats: Annotated[int, typer.Option(help="timed repetitions; medians are reported")] = 5,
    mode: Annotated[str | None, typer.Option(help="dash decision mode: async or sync (default: the policy's)")] = None,
    control: ControlOpt = "on",
    majority: Annotated[bool, typer.Option(help="batch-majority voting instead of per-row states")] = False,
    quantized_outer: Annotated[
        bool, typer.Option(help="with --method int8 / int4: the first and last layer in that state too")
    ] = False,
    head: Annotated[str, typer.Option(help="LM head precision in the engine: full, bf16 or int8")] = "full",
    kv_cache_dtype: KVCacheDtypeOpt = "float32",
    policy: Annotated[Path | None, typer.Option(help="policy file (default: the one shipped for the alias)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the shared data sets")] = None,
    out: Annotated[Path | None, typer.Option(help="also write the JSON result here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON result instead of the table")] = False,
) -> None:
    """Time prefill and decode: transformers generate, the engine's full path and a method, in one run.

    Example: dashskip bench --model smollm2-135m --method dash --speedup 1.2 --batch 1 --new-tokens 32
    """
    from dashskip.core.files import atomic_write_text
    from dashskip.eval.bench import run_bench

    result = run_bench(
        model, method, speedup, batch, prompt_len, new_tokens, repeats, mode, majority, head, policy, data_dir,
        control=_control(control), quantized_outer=quantized_outer, kv_cache_dtype=kv_cache_dtype,
    )
    data = result.to_dict()
    if out is not None:
        atomic_write_text(out, json.dumps(data, indent=2))
    typer.echo(json.dumps(data, indent=2) if as_json else result.table())


@app.command()
def models() -> None:
    """List the embedded model aliases.

    Example: dashskip models
    """
    for alias in ALIASES.values():
        status = "installed" if alias.installed() else f"not installed: {alias.install}"
        typer.echo(f"{alias.name:14s} {alias.description}  [{status}]")


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    policy: Annotated[Path | None, typer.Option(help="policy file (default: the one shipped for the alias)")] = None,
    speedup: Annotated[float, typer.Option(help="default operating point; a request may ask for another")] = 1.0,
    mode: Annotated[str | None, typer.Option(help="decision mode: async (default of the policy) or sync")] = None,
    control: ControlOpt = "on",
    host: Annotated[str, typer.Option(help="address to listen on; 127.0.0.1 keeps the server local")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port)")] = 8000,
    max_tokens: Annotated[int, typer.Option(min=1, help="most new tokens one request may ask for")] = 512,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="most prompt tokens one request may send")] = 4096,
    max_batch: Annotated[int, typer.Option(min=1, help="requests decoded together in one step")] = 32,
    prefill_chunk: Annotated[
        int, typer.Option(min=16, help="prompt tokens prefilled between two decode steps (larger: more throughput, "
                          "longer pauses of running streams)")
    ] = 1024,
    max_queue: Annotated[int, typer.Option(min=1, help="requests waiting or running; more get 429")] = 256,
    max_queued_tokens: Annotated[
        int, typer.Option(min=1, help="prompt + new tokens of all requests waiting or running; more get 429")
    ] = 65536,
    max_queue_seconds: Annotated[
        float, typer.Option(min=0.1, help="a request not started after this long gets 503 with Retry-After")
    ] = 60.0,
    api_key: Annotated[
        str | None, typer.Option(envvar="DASHSKIP_API_KEY", help="require `Authorization: Bearer KEY` on /v1/...")
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Host header value to accept besides the bind address, repeatable; * accepts any"),
    ] = None,
    special_tokens_in_content: Annotated[
        bool, typer.Option(help="let chat content spell special tokens (by default they are plain text)")
    ] = False,
    served_model_name: Annotated[
        str | None, typer.Option(help="the `model` clients must send (default: the alias, or the folder's name)")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="dashskip (this server) or vllm (vLLM's OpenAI server with the DASH plugin)")
    ] = "dashskip",
    kv_cache_gib: Annotated[float, typer.Option(min=0.1, help="--engine vllm: memory for vLLM's K/V cache")] = 2.0,
    batch_states: Annotated[
        str,
        typer.Option(help="token (each request its own states) or majority (a decode step runs, per layer, the "
                     "state most of its requests chose: one set of weight reads; a request's text then depends on "
                     "what it is batched with)"),
    ] = "token",
    kv_cache_dtype: KVCacheDtypeOpt = "float32",
) -> None:
    """Serve an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (both streaming), /v1/models.

    Example: dashskip serve --model smollm2-135m --speedup 1.2 --port 8000
    then: curl http://127.0.0.1:8000/v1/completions -H 'content-type: application/json'
    -d '{"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8}'
    With --engine vllm a request picks its operating point with "vllm_xargs": {"dash_speedup": 2.0}.
    """
    if engine not in ("dashskip", "vllm"):
        raise DashskipError(f"--engine must be dashskip or vllm, got '{engine}'")
    KVCacheDtype.parse(kv_cache_dtype)  # a typo is refused before the model loads
    if engine == "vllm":
        if kv_cache_dtype != "float32":
            raise DashskipError("--kv-cache-dtype is the dashskip engine's; vLLM keeps its own K/V cache (drop it)")
        _serve_vllm(model, policy, speedup, _control(control), host, port, served_model_name, max_batch,
                    max_prompt_tokens + max_tokens, api_key, kv_cache_gib, batch_states)  # fmt: skip
        return
    from dashskip.serve.scheduler import BatchLimits, off_the_main_thread
    from dashskip.serve.server import (
        LOOPBACK_HOSTS,
        Security,
        ServerLimits,
        create_app,
        default_served_name,
        listen,
        make_server,
    )

    hosts = None
    if allowed_host:
        hosts = ("*",) if "*" in allowed_host else (*LOOPBACK_HOSTS, host, *allowed_host)
    elif host not in LOOPBACK_HOSTS:
        hosts = ("*",)  # the names clients reach a public address by are not known here
    if host not in LOOPBACK_HOSTS:
        auth = "requests need the API key" if api_key else "it has no API key (--api-key)"
        typer.echo(f"note: listening on {host} exposes the server beyond this machine; {auth}", err=True)
    security = Security(hosts, api_key, special_tokens_in_content)
    batch = BatchLimits(max_batch=max_batch, prefill_chunk=prefill_chunk, max_queue=max_queue,
                        max_queued_tokens=max_queued_tokens, max_queue_seconds=max_queue_seconds,
                        batch_states=batch_states)  # fmt: skip
    limits = ServerLimits(max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, batch=batch)
    sock = listen(host, port)  # a busy port fails before the model loads
    # with the shipped policy loaded, requests can move the operating point even when the default is 1.0
    dm = off_the_main_thread(lambda: from_pretrained(model, speedup=speedup, policy=policy or bundled_policy(model),
                                                     mode=mode, control=_control(control),
                                                     kv_cache_dtype=kv_cache_dtype))  # fmt: skip
    name = served_model_name or default_served_name(model)
    server = make_server(create_app(dm, name, limits, security, bind=host), sock)
    typer.echo(f"serving '{name}' at http://{host}:{server.port}/v1 (OpenAI-compatible); Ctrl-C stops", err=True)
    server.run()


def _serve_vllm(model: str, policy: Path | None, speedup: float, control: bool, host: str, port: int,
                name: str | None, max_batch: int, max_len: int, api_key: str | None, kv_cache_gib: float,
                batch_states: str) -> None:
    """Replace this process by vLLM's OpenAI server running the model folder with DASH (`dashskip.vllm`)."""
    import importlib.util
    import os
    import shlex

    from dashskip.models.loading import resolve
    from dashskip.serve.server import default_served_name
    from dashskip.vllm import serve_command

    if importlib.util.find_spec("vllm") is None:
        raise DashskipError("vLLM is not installed in this environment; set one up as the README's 'Serving with "
                            "vLLM' says (pip install -e '.[vllm]'), or use --engine dashskip")  # fmt: skip
    folder = resolve(model)
    if not Path(folder).is_dir():
        raise DashskipError(f"--engine vllm serves a local model folder or an alias; '{model}' is neither")
    name = name or default_served_name(model)
    command = serve_command(folder, speedup, None if policy is None else str(policy), control, host, port, name,
                            max_batch, max_len, int(kv_cache_gib * 2**30), batch_states)  # fmt: skip
    env = {**os.environ, **({"VLLM_API_KEY": api_key} if api_key else {})}
    typer.echo("running: " + shlex.join(command), err=True)
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


def _read_turn() -> str | None:
    """The user's next message; None at /exit or at the end of input (Ctrl-D)."""
    try:
        line = input("you> ").strip()
    except EOFError:
        typer.echo("")
        return None
    return None if line == "/exit" else line


@app.command()
def chat(
    model: ModelOpt = DEFAULT_MODEL,
    speedup: Annotated[float, typer.Option(help="operating point; 1.0 = every layer in full")] = 1.0,
    policy: Annotated[Path | None, typer.Option(help="policy file (default: the one shipped for the alias)")] = None,
    mode: Annotated[str | None, typer.Option(help="decision mode: async (default of the policy) or sync")] = None,
    control: ControlOpt = "on",
    system: Annotated[str | None, typer.Option(help="a system message opening the conversation")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens per reply")] = 256,
    sample: Annotated[bool, typer.Option(help="sample instead of greedy decoding")] = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> None:
    """Chat in the terminal through the model's chat template, streaming each reply; /exit or Ctrl-D quits.

    Example: dashskip chat --model smollm2-135m --speedup 1.2 --system "Answer in one sentence."
    """
    from transformers import TextStreamer

    from dashskip.models.chat import chat_input_ids

    dm = from_pretrained(model, speedup=speedup, policy=policy, mode=mode, control=_control(control))
    tok = dm.tokenizer
    messages = [{"role": "system", "content": system}] if system else []
    generator = torch.Generator().manual_seed(seed)
    typer.echo("type a message; /exit or Ctrl-D quits", err=True)
    while (line := _read_turn()) is not None:
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = torch.tensor([chat_input_ids(tok, messages)])
        out = dm.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature,
            top_p=top_p,
            streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True),
            return_dict_in_generate=True,
            generator=generator,
        )
        new = out.sequences[0, ids.shape[1] :]
        messages.append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)})
        typer.echo(f"[{new.numel()} tokens, decode {out.speedup:.2f}x the full path (cost table), compute ratio "
                   f"{out.compute_ratio:.2f}]", err=True)  # fmt: skip


def main() -> None:
    """Every mistake is one line on stderr and exit code 2: the library's own errors and the command line's
    (unknown commands and options, bad values, missing arguments)."""
    try:
        app(standalone_mode=False)
    except DashskipError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:  # typer's click: usage errors, bad parameters, no command
        sys.exit(_usage_error(exc))


def _usage_error(exc: typer.TyperException) -> int:
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    if len(sys.argv) < 2 or not message.strip():
        commands = ", ".join(sorted(_command_names()))
        message = f"no command given; choose one of {commands}"
    command = " ".join(sys.argv[1:2]) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
    hint = f"`dashskip {command} --help`" if command and command in _command_names() else "`dashskip --help`"
    typer.echo(f"error: {' '.join(message.split()).rstrip('.')}; see {hint}", err=True)
    return 2


def _command_names() -> set[str]:
    return {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
