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

from dashskip.errors import DashskipError
from dashskip.loading import ALIASES, DEFAULT_MODEL

app = typer.Typer(
    help="DASH layer skipping for Hugging Face decoder LLMs. Run `dashskip COMMAND --help` for examples.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help=f"alias ({', '.join(ALIASES)}), model folder or hub id")]


def _load(model: str, calibration: Path | None = None, kv_rule: str = "copy", speedup: float = 1.0):
    from dashskip.api import from_pretrained

    t0 = time.perf_counter()
    dm = from_pretrained(model, speedup=speedup, calibration=calibration, kv_rule=kv_rule)
    return dm, time.perf_counter() - t0


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt text")],
    model: ModelOpt = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
    speedup: Annotated[float, typer.Option(help="operating point; 1.0 = every layer in full")] = 1.0,
    calibration: Annotated[Path | None, typer.Option(help="calibration file (skip scales)")] = None,
    kv_rule: Annotated[str, typer.Option(help="K/V of skipped tokens: copy or project")] = "copy",
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the tokenizer's chat template")] = False,
    sample: Annotated[bool, typer.Option(help="sample instead of greedy decoding")] = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="print one JSON object: text and per-token statistics")
    ] = False,
) -> None:
    """Generate text, streaming tokens as they come.

    Example: dashskip generate "The capital of France is" --max-new-tokens 20
    """
    if not prompt.strip():
        raise DashskipError("empty prompt: give some text to continue")
    dm, load_s = _load(model, calibration, kv_rule, speedup)
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
    )
    seconds = time.perf_counter() - t0
    new = out.sequences[0, ids.shape[1] :]
    if as_json:
        stats = out.stats()
        stats.update(
            new_tokens=int(new.numel()),
            seconds=round(seconds, 3),
            load_seconds=round(load_s, 2),
            tokens_per_second=round(new.numel() / seconds, 2),
            cost_table_measured=dm.costs.measured,
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
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Measure each state's per-layer time (decode and prefill) and error, and store the cost table.

    Example: dashskip profile --model smollm2-135m --repeats 5 --calibration calib.json
    """
    from dashskip.data import load_text, token_windows
    from dashskip.profiling import default_profile_path, state_errors
    from dashskip.profiling import profile as run_profile

    dm, _ = _load(model, calibration)
    try:
        chosen = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise DashskipError(f"--layers must be comma-separated integers, got '{layers}'") from None
    table = run_profile(dm.engine, dm.fingerprint, context, prefill_tokens, repeats, chosen)
    if errors:
        ids = token_windows(dm.tokenizer, load_text(data, data_dir), 1, error_tokens, seed=0)
        table.errors = state_errors(dm.engine, ids)
    path = out or default_profile_path(dm.fingerprint)
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


@app.command()
def models() -> None:
    """List the embedded model aliases."""
    for alias in ALIASES.values():
        typer.echo(f"{alias.name:14s} {alias.description}  (install: {alias.install})")


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
