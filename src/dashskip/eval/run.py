"""`dashskip eval`: one method at one operating point on perplexity text or a task, as one result row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dashskip.api import from_pretrained
from dashskip.data import load_text
from dashskip.eval.evaluation import perplexity, perplexity_windows
from dashskip.eval.tasks import TaskSettings, run_task
from dashskip.measure.calibration import Calibration
from dashskip.measure.profiling import cost_table_for
from dashskip.methods import MethodOptions, build, check_method
from dashskip.methods.exits import EarlyExit


def evaluate(
    model: str,
    method: str,
    speedup: float,
    task: str = "perplexity",
    policy: str | Path | None = None,
    calibration: str | Path | None = None,
    mode: str | None = None,
    data: str = "wikitext2",
    data_dir: str | Path | None = None,
    context: int = 256,
    limit: int | None = None,
    cache: Path | None = None,
    control: bool = True,
) -> dict[str, Any]:
    """The result row: quality with its SE and sample count, the measured compute ratio, what ran."""
    check_method(method)
    dash = method == "dash"
    dm = from_pretrained(model, policy=policy if dash else None, mode=mode,
                         wall_clock=False)  # methods are compared at compute ratios
    # Every method on this host's table, so one measure places them all; DASH reads its operating curve on it
    # (the states each of its biases ran, kept in the policy file)
    costs = cost_table_for(dm.engine, dm.fingerprint)
    options = MethodOptions(mode=mode, calibration=Calibration.load(calibration) if calibration else None,
                            control=control)  # fmt: skip
    built = build(dm.method_context(data_dir, costs=costs), method, speedup, options)
    engine, decider = built.engine or dm.engine, built.decider
    row: dict[str, Any] = {
        "model": model,
        "method": method,
        "requested_speedup": speedup if method != "full" else 1.0,
        "mode": mode or (dm.policy.config.mode if dash else None),
        "control": control if dash else None,
        "cost_table": costs.provenance(),
    }
    if task != "perplexity":
        result = run_task(engine, dm.tokenizer, task, decider, costs, TaskSettings(limit=limit), data_dir, cache)
        return {**row, **result.as_dict()}
    windows = perplexity_windows(dm.tokenizer, load_text(data, data_dir), context, limit)
    row.update(perplexity(engine, windows, decider, costs).as_dict())
    if isinstance(decider, EarlyExit):  # LM-head evaluations the layer-count compute ratio leaves out
        row["exit_checks_per_token"] = round(decider.checks_per_token, 3)
    return row
