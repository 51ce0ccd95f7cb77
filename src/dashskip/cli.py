"""The `dashskip` command line: one entry point, a subcommand per job."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated

import click
import torch
import typer

from dashskip.api import from_pretrained
from dashskip.errors import DashskipError
from dashskip.loading import ALIASES, DEFAULT_MODEL
from dashskip.policy import PolicyDecider

app = typer.Typer(
    help="DASH layer skipping for Hugging Face decoder LLMs. Run `dashskip COMMAND --help` for examples.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help=f"alias ({', '.join(ALIASES)}), model folder or hub id")]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt text")],
    model: ModelOpt = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
    speedup: Annotated[float, typer.Option(help="operating point; 1.0 = every layer in full")] = 1.0,
    policy: Annotated[Path | None, typer.Option(help="policy file (default: the one shipped for the alias)")] = None,
    mode: Annotated[str | None, typer.Option(help="decision mode: async (default of the policy) or sync")] = None,
    calibration: Annotated[Path | None, typer.Option(help="calibration file (skip scales, without a policy)")] = None,
    kv_rule: Annotated[str | None, typer.Option(help="K/V of skipped tokens: copy or project")] = None,
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
        str,
        typer.Option(
            help="lossless drafter: dash (the DASH path at --speedup, its full layers in INT8), int8 or int4 "
            "(every inner layer; int8 is the fastest on CPUs)"
        ),
    ] = "dash",
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object: text and per-token statistics")
    ] = False,
) -> None:
    """Generate text, streaming tokens as they come.

    Example: dashskip generate "The capital of France is" --max-new-tokens 20

    Lossless (the full model's exact output, drafted by DASH): dashskip generate "Once upon" --speedup 2.0 --lossless

    Lossless, fastest on CPUs (INT8 drafts): dashskip generate "Once upon" --lossless --draft int8
    """
    if not prompt.strip():
        raise DashskipError("empty prompt: give some text to continue")
    t0 = time.perf_counter()
    dm = from_pretrained(model, speedup=speedup, policy=policy, calibration=calibration, kv_rule=kv_rule, mode=mode)
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
            mode=dm.decider.mode if isinstance(dm.decider, PolicyDecider) else None,
            new_tokens=int(new.numel()),
            seconds=round(seconds, 3),
            load_seconds=round(load_s, 2),
            tokens_per_second=round(new.numel() / seconds, 2),
            cost_table_measured=dm.costs.measured,
            **({"lossless": dm.last_speculative.as_dict()} if lossless else {}),
        )
        print(
            json.dumps(
                {"model": model, "prompt": prompt, "text": tok.decode(new, skip_special_tokens=True), "stats": stats}
            )
        )
    else:
        typer.echo(
            f"\n[{new.numel()} tokens, {new.numel() / seconds:.1f} tok/s, compute ratio {out.compute_ratio:.2f}]",
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
    from dashskip.calibration import calibrate as run_calibration
    from dashskip.data import load_text, token_windows
    from dashskip.loading import fingerprint, load_model

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
    from dashskip.data import load_text, token_windows
    from dashskip.profiling import default_profile_path, state_errors
    from dashskip.profiling import profile as run_profile

    dm = from_pretrained(model, calibration=calibration, kv_rule=kv_rule)
    try:
        chosen = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise DashskipError(f"--layers must be comma-separated integers, got '{layers}'") from None
    table = run_profile(dm.engine, dm.fingerprint, context, prefill_tokens, repeats, chosen)
    if errors:
        ids = token_windows(dm.tokenizer, load_text(data, data_dir), 1, error_tokens, seed=0)
        table.errors = state_errors(dm.engine, ids)
    path = out or default_profile_path(dm.fingerprint, str(dm.engine.kv_rule))
    table.save(path)
    if as_json:
        print(json.dumps({"out": str(path), "decode": table.decode, "prefill": table.prefill, "errors": table.errors}))
        return
    typer.echo("state  decode-cost  prefill-cost  decode-ms/layer  prefill-ms/layer  output-error  update-error")
    for name, s in (("skip", 0), ("int4", 1), ("int8", 2), ("full", 4)):
        dms = statistics.mean(table.layer_ms["decode"][str(s)])
        pms = statistics.mean(table.layer_ms["prefill"][str(s)])
        err = table.errors.get("output", {}).get(str(s))
        upd = table.errors.get("update", {}).get(str(s))
        errs = f"{statistics.mean(err):12.4f}  {statistics.mean(upd):12.4f}" if err else f"{0:12.4f}  {0:12.4f}"
        typer.echo(f"{name:5s}  {table.decode[s]:11.3f}  {table.prefill[s]:12.3f}  {dms:15.3f}  {pms:16.2f}  {errs}")
    typer.echo(f"wrote {path} (errors: mean over layers 1..L-2, relative to the full layer's output / update)")


TRAIN_SPLIT = {"wikitext2": "wikitext2-valid"}  # train on validation text; test stays clean for evaluation


def _cost_table(dm, progress: bool = True):
    """The measured cost table of this model on this machine; measured now (quick) if there is none yet."""
    from dashskip.profiling import CostTable, default_profile_path
    from dashskip.profiling import profile as run_profile

    path = default_profile_path(dm.fingerprint, str(dm.engine.kv_rule))
    if path.exists():
        return CostTable.load(path, dm.fingerprint)
    typer.echo(
        "no cost table for this model on this machine yet; measuring one (dashskip profile does it fully)", err=True
    )
    n = dm.backbone.num_layers
    table = run_profile(dm.engine, dm.fingerprint, repeats=3, layers=list(range(1, n - 1, 3)), progress=progress)
    table.save(path)
    return table


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
        str, typer.Option(help="states the policy may choose, e.g. 0,2,4 to leave INT4 out (4 = full is required)")
    ] = "0,1,2,4",
    ratio_target: Annotated[
        float, typer.Option(help="compute ratio the sampled paths are held at (0: fixed beta)")
    ] = 1.5,
    eps: Annotated[float, typer.Option(help="tolerated relative perplexity change per token")] = 2.0,
    tau0: float = 1.0,
    tau_decay: float = 0.005,
    mode: Annotated[str, typer.Option(help="decision mode the policy is trained in: async or sync")] = "async",
    kv_rule: Annotated[str, typer.Option(help="K/V rule for skipped tokens: project or copy")] = "project",
    checkpoint_every: int = 20,
    heldout_windows: Annotated[int, typer.Option(help="held-out windows for the operating points")] = 12,
    heldout_len: Annotated[int, typer.Option(help="tokens per held-out window")] = 256,
    seed: int = 0,
) -> None:
    """Train a DASH policy by policy gradient; re-running the same command resumes from the last checkpoint.

    Example: dashskip train --model smollm2-135m --data wikitext2 --speedup 1.33 --speedup 1.67 --speedup 2.0
    """
    from dashskip.api import DashModel
    from dashskip.calibration import Calibration
    from dashskip.calibration import calibrate as run_calibration
    from dashskip.data import CHOICE_TASKS, leading_bos, load_choice_questions, load_text, token_windows
    from dashskip.loading import fingerprint, load_model
    from dashskip.training import DEFAULT_TARGETS, ChoiceQuestion, TrainConfig
    from dashskip.training import train as run_training

    hf, tok = load_model(model)
    fp = fingerprint(hf)
    choice = data in CHOICE_TASKS
    text = None if choice else load_text(TRAIN_SPLIT.get(data, data), data_dir)
    out.mkdir(parents=True, exist_ok=True)
    if calibration is None:
        calibration = out / "calibration.json"
        if not calibration.exists():
            windows = token_windows(tok, text or load_text("wikitext2-valid", data_dir), 64, 256, seed)
            run_calibration(hf, windows, fp, meta={"model": model, "data": data}).save(calibration)
    cal = Calibration.load(calibration)
    dm = DashModel(hf, tok, calibration=cal, kv_rule=kv_rule)
    costs = _cost_table(dm)
    if choice:
        prefix = [] if leading_bos(tok) is None else [leading_bos(tok)]
        corpus = [
            ChoiceQuestion(
                prefix + tok(p, add_special_tokens=False)["input_ids"],
                [tok(c, add_special_tokens=False)["input_ids"] for c in cs],
                answer,
            )
            for p, cs, answer in load_choice_questions(data, data_dir)
        ]
    else:
        corpus = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        beta=beta,
        efficiency=efficiency,
        policy={} if states == "0,1,2,4" else {"allowed": _parse_states(states)},
        ratio_target=ratio_target or None,
        eps=eps,
        tau0=tau0,
        tau_decay=tau_decay,
        seed=seed,
        checkpoint_every=checkpoint_every,
        kv_rule=kv_rule,
        mode=mode,
        heldout_windows=heldout_windows,
        heldout_len=heldout_len,
        bos_token_id=leading_bos(tok),
        targets=tuple(sorted(set(speedup or DEFAULT_TARGETS))),
    )
    t0 = time.perf_counter()
    policy = run_training(dm.engine, corpus, costs, cfg, out, {"fingerprint": fp, "model": model, "data": data})
    policy.meta["train_seconds"] = round(time.perf_counter() - t0, 1)
    policy.save(out / "policy.safetensors")
    typer.echo(
        f"wrote {out / 'policy.safetensors'}; operating points (held-out compute ratio): "
        f"{policy.meta['operating_point_ratios']}"
    )


def _parse_states(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise DashskipError(f"--states takes comma-separated states among 0, 1, 2, 4; got '{text}'") from None


@app.command("eval")
def evaluate(
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[
        str,
        typer.Option(
            help="full, dash, static (ShortGPT-style similarity skipping), a quantization-only baseline: int8, "
            "int4, mixed (static INT4/INT8 per layer), mixed-skip (plus static skipping), or early-exit, "
            "skipdecode, adaskip, random (the DASH paper's baselines); docs/cli.md says what each is"
        ),
    ] = "dash",
    speedup: float = 1.67,
    policy: Annotated[Path | None, typer.Option(help="policy file (default: the one shipped for the alias)")] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="calibration file for static/adaskip/skipdecode/random (default: cached one)")
    ] = None,
    decisions: Annotated[str | None, typer.Option("--mode", help="dash decision mode: async or sync")] = None,
    task: Annotated[
        str,
        typer.Option(
            help="perplexity (the default, on --data) or arc-easy, arc-challenge, hellaswag, mmlu, sst2, rte, xsum, "
            "cnn-dailymail"
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
    from dashskip.api import from_pretrained
    from dashskip.baselines import EarlyExit, build_decider, check_method
    from dashskip.calibration import Calibration
    from dashskip.data import load_text
    from dashskip.evaluation import perplexity, perplexity_windows

    check_method(method)
    cal = Calibration.load(calibration) if calibration is not None else None
    dash = method == "dash"
    dm = from_pretrained(model, speedup=speedup if dash else 1.0, policy=policy if dash else None, mode=decisions)
    if not dash:  # DASH keeps the table its operating points were calibrated with
        dm.costs = _cost_table(dm)
    decider = build_decider(dm, method, speedup, data_dir=data_dir, mode=decisions, calibration=cal)
    if task != "perplexity":
        _eval_task(dm, decider, task, limit, data_dir, cache, as_json, {"model": model, "method": method})
        return
    windows = perplexity_windows(dm.tokenizer, load_text(data, data_dir), context, limit)
    result = perplexity(dm.engine, windows, decider, dm.costs)
    row = {
        "model": model,
        "method": method,
        "requested_speedup": speedup if method != "full" else 1.0,
        "mode": decisions or (dm.policy.config.mode if dash else None),
        **result.as_dict(),
    }
    if isinstance(decider, EarlyExit):  # LM-head evaluations the layer-count compute ratio leaves out
        row["exit_checks_per_token"] = round(decider.checks_per_token, 3)
    if as_json:
        print(json.dumps(row))
        return
    typer.echo(
        f"{method} @ {row['requested_speedup']}x: ppl {result.ppl:.3f} ± {result.ppl_se:.3f} (SE, "
        f"{result.windows} windows x {context} tokens), compute ratio {result.compute_ratio:.3f}"
    )


def _eval_task(dm, decider, task: str, limit, data_dir, cache, as_json: bool, row: dict) -> None:
    from dashskip.tasks import TaskSettings, run_task

    result = run_task(dm.engine, dm.tokenizer, task, decider, dm.costs, TaskSettings(limit=limit), data_dir, cache)
    data = {**row, **result.as_dict()}
    if as_json:
        print(json.dumps(data))
        return
    scores = ", ".join(
        f"{name} {m.value:.4f} ± {m.se:.4f}" for name, m in result.metrics.items() if name != "nll"
    )  # fmt: skip
    typer.echo(
        f"{row['method']} on {task}: {scores} (SE, {result.examples} examples), compute ratio "
        f"{result.compute_ratio:.3f}"
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
        typer.Option(
            help="comma-separated: dash, static, int8, int4, mixed, mixed-skip, early-exit, "
            "skipdecode, adaskip, random, rl-adapter (the full model is always run)"
        ),
    ] = "dash,static,int8,mixed,early-exit,skipdecode,adaskip,random",
    speedups: Annotated[str, typer.Option(help="requested compute ratios")] = "1.33,1.67,2.0",
    tasks: Annotated[
        str, typer.Option(help="wikitext2, arc-easy, arc-challenge, hellaswag, mmlu, sst2, rte, xsum, cnn-dailymail")
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
        Path | None, typer.Option(help="adapters of the rl-adapter method (python -m dashskip.rl_adapter)")
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
    from dashskip.sweep import Sweep, SweepSpec, parse_limits

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
    speedup: Annotated[float, typer.Option(help="operating point of the dash method")] = 2.0,
    batch: Annotated[int, typer.Option(help="rows decoded together")] = 1,
    prompt_len: Annotated[int, typer.Option(help="prompt tokens per row (WikiText-2 test windows)")] = 64,
    new_tokens: Annotated[int, typer.Option(help="tokens generated per row")] = 32,
    repeats: Annotated[int, typer.Option(help="timed repetitions; medians are reported")] = 5,
    mode: Annotated[str | None, typer.Option(help="dash decision mode: async or sync (default: the policy's)")] = None,
    majority: Annotated[bool, typer.Option(help="batch-majority voting instead of per-row states")] = False,
    head: Annotated[str, typer.Option(help="LM head precision in the engine: full, bf16 or int8")] = "full",
    policy: Annotated[Path | None, typer.Option(help="policy file (default: the one shipped for the alias)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="folder holding the shared data sets")] = None,
    out: Annotated[Path | None, typer.Option(help="also write the JSON result here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON result instead of the table")] = False,
) -> None:
    """Time prefill and decode: transformers generate, the engine's full path and a method, in one run.

    Example: dashskip bench --model smollm2-135m --method dash --speedup 2.0 --batch 1 --new-tokens 32
    """
    from dashskip.bench import run_bench
    from dashskip.profiling import atomic_write_text

    result = run_bench(
        model, method, speedup, batch, prompt_len, new_tokens, repeats, mode, majority, head, policy, data_dir
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
        typer.echo(f"{alias.name:14s} {alias.description}  (install: {alias.install})")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    policy: Annotated[Path | None, typer.Option(help="policy file (default: the one shipped for the alias)")] = None,
    speedup: Annotated[float, typer.Option(help="default operating point; a request may ask for another")] = 1.0,
    mode: Annotated[str | None, typer.Option(help="decision mode: async (default of the policy) or sync")] = None,
    host: Annotated[str, typer.Option(help="address to listen on; 127.0.0.1 keeps the server local")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port)")] = 8000,
    max_tokens: Annotated[int, typer.Option(min=1, help="most new tokens one request may ask for")] = 512,
    served_model_name: Annotated[
        str | None, typer.Option(help="the `model` clients must send (default: the alias, or the folder's name)")
    ] = None,
) -> None:
    """Serve an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (both streaming), /v1/models.

    Example: dashskip serve --model smollm2-135m --speedup 1.67 --port 8000
    then: curl http://127.0.0.1:8000/v1/completions -H 'content-type: application/json'
    -d '{"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8}'
    """
    from dashskip.api import bundled_policy
    from dashskip.server import ServerLimits, create_app, default_served_name, listen, make_server

    sock = listen(host, port)  # a busy port fails before the model loads
    # with the shipped policy loaded, requests can move the operating point even when the default is 1.0
    dm = from_pretrained(model, speedup=speedup, policy=policy or bundled_policy(model), mode=mode)
    name = served_model_name or default_served_name(model)
    server = make_server(create_app(dm, name, ServerLimits(max_tokens=max_tokens)), sock)
    if host not in LOOPBACK:
        typer.echo(f"note: listening on {host} exposes the server beyond this machine; it has no auth", err=True)
    typer.echo(f"serving '{name}' at http://{host}:{server.port}/v1 (OpenAI-compatible); Ctrl-C stops", err=True)
    server.run()


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
    system: Annotated[str | None, typer.Option(help="a system message opening the conversation")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens per reply")] = 256,
    sample: Annotated[bool, typer.Option(help="sample instead of greedy decoding")] = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> None:
    """Chat in the terminal through the model's chat template, streaming each reply; /exit or Ctrl-D quits.

    Example: dashskip chat --model smollm2-135m --speedup 1.67 --system "Answer in one sentence."
    """
    from transformers import TextStreamer

    from dashskip.chat import chat_input_ids

    dm = from_pretrained(model, speedup=speedup, policy=policy, mode=mode)
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
        typer.echo(f"[{new.numel()} tokens, compute ratio {out.compute_ratio:.2f}]", err=True)


def main() -> None:
    try:
        app(standalone_mode=False)
    except DashskipError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
