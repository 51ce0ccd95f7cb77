"""`dashskip sweep`: methods x operating points x tasks on one model, through one harness.

Every cell is scored on the same examples as the full model, so besides each cell's own standard error the
report gives the paired difference to the full model with its standard error (much tighter than the two SEs
apart). Per-example results are cached under the output folder: re-running the same command resumes.
Writes `results.json`, `results.csv`, `table.md` (rows methods, columns operating point x task, full model on
top, like the paper's tables 1-2) and, unless turned off, the Pareto plot and the per-layer state map.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dashskip.core import states
from dashskip.core.files import atomic_write_text
from dashskip.errors import DashskipError
from dashskip.eval.tasks import TASKS, TaskResult, TaskSettings, paired_difference, run_task
from dashskip.methods import MethodOptions, build, check_method
from dashskip.methods.context import calibration_for

DEFAULT_LIMITS = {
    "wikitext2": 40,
    "arc-easy": 200,
    "arc-challenge": 200,
    "hellaswag": 200,
    "mmlu": 114,  # two questions per subject
    "sst2": 200,
    "rte": 277,
    "xsum": 20,
    "cnn-dailymail": 10,
}


@dataclass
class Cell:
    method: str
    target: float  # requested compute ratio (1.0 = the full model)
    task: str
    metric: str  # the task's primary metric
    value: float
    se: float
    n: int
    compute_ratio: float  # measured over every token the task ran
    delta: float = 0.0  # paired difference to the full model over the same examples (for ppl: of the mean NLL)
    delta_se: float = 0.0
    # Generation tasks: the full model's wall time per example over this method's (prefill + decode, same prompts)
    wall_ratio: float | None = None
    request: float | None = None  # what the method was asked for, where it differs from the target (DASH matched)
    metrics: dict = field(default_factory=dict)
    unreachable: str | None = None


@dataclass
class SweepSpec:
    model: str
    methods: list[str]
    speedups: list[float]
    tasks: list[str]
    limits: dict[str, int]
    out: Path
    policy: str | None = None
    variants: dict[str, str] = field(default_factory=dict)  # label -> policy file (DASH variants, the ablation)
    rl_adapter: str | None = None  # trained adapters of the RL-adapter baseline (`dashskip train-rl-adapter`)
    mode: str | None = None
    seed: int = 0
    match: bool = True  # correct DASH's request once so its measured ratio on WikiText-2 meets the target
    data_dir: str | None = None
    plots: bool = True

    def check(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise DashskipError(f"unknown task(s) {', '.join(unknown)}; use any of {', '.join(TASKS)}")
        if not self.speedups or any(not s > 1.0 for s in self.speedups):
            raise DashskipError(f"speedups must be > 1.0 (the full model is always included), got {self.speedups}")
        if not self.methods and not self.variants:
            raise DashskipError("no methods given; e.g. --methods dash,static,int8")
        for method in self.methods:
            check_method(method)
        if "rl-adapter" in self.methods and not self.rl_adapter:
            raise DashskipError("method 'rl-adapter' needs its trained adapters: --rl-adapter FILE")


def parse_limits(text: str | None) -> dict[str, int]:
    """'100' (every task) or 'wikitext2=40,arc-easy=100' (the rest keep their defaults)."""
    limits = dict(DEFAULT_LIMITS)
    if not text:
        return limits
    try:
        if "=" not in text:
            return {task: int(text) for task in limits}
        for part in text.split(","):
            task, value = part.split("=")
            limits[task.strip()] = int(value)
    except ValueError:
        raise DashskipError(
            f"--limit '{text}': give a number or task=N pairs, e.g. wikitext2=40,arc-easy=100"
        ) from None
    return limits


def _unreachable(exc: DashskipError) -> str:
    """A method that cannot reach an operating point gets an 'unreachable' cell; any other error stops the sweep."""
    if "reach" not in str(exc):
        raise exc
    return str(exc)


def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]


@contextmanager
def _scales(engine, scales) -> Iterator[None]:
    """A DASH variant runs with the skip scales it was trained with."""
    saved = engine.scales
    engine.scales = torch.as_tensor(scales, dtype=torch.float32)
    try:
        yield
    finally:
        engine.scales = saved


class Sweep:
    def __init__(self, spec: SweepSpec, progress: bool = True) -> None:
        from dashskip.api import from_pretrained
        from dashskip.methods.dash.policy import DashPolicy

        spec.check()
        self.spec, self.progress = spec, progress
        self.dm = from_pretrained(spec.model, policy=self._policy_file(), mode=spec.mode, wall_clock=False)
        self.variants = {label: DashPolicy.load(path) for label, path in spec.variants.items()}
        for label, policy in self.variants.items():
            policy.check(self.dm.fingerprint)
            if policy.meta["kv_rule"] != str(self.dm.engine.kv_rule):
                raise DashskipError(
                    f"variant '{label}' was trained with the '{policy.meta['kv_rule']}' K/V rule, the sweep runs "
                    f"'{self.dm.engine.kv_rule}'; sweep it separately with a --policy of that rule"
                )
        self.cells: list[Cell] = []
        self.context = self.dm.method_context(spec.data_dir, progress)
        self.full: dict[str, TaskResult] = {}

    def _policy_file(self) -> str | None:
        from dashskip.api import bundled_policy

        if "dash" not in self.spec.methods:
            return None
        path = self.spec.policy or bundled_policy(self.spec.model)
        if path is None:
            raise DashskipError(f"method 'dash' needs a policy for '{self.spec.model}': pass --policy FILE")
        self._dash_hash = _file_hash(str(path))
        return str(path)

    def _cache(self, key: str, task: str) -> Path:
        return self.spec.out / "examples" / self.dm.fingerprint / key / f"{task}.jsonl"

    def _run(self, key: str, task: str, decider, engine=None) -> TaskResult:
        settings = TaskSettings(limit=self.spec.limits.get(task))
        return run_task(
            engine or self.dm.engine, self.dm.tokenizer, task, decider, self.dm.costs, settings, self.spec.data_dir,
            self._cache(key, task), self.progress, run={"method": key},
        )  # fmt: skip

    def _cell(self, method: str, target: float, result: TaskResult, request: float | None = None) -> Cell:
        metric = result.primary
        full = self.full.get(result.task)
        delta, delta_se = (0.0, 0.0)
        if full is not None and method != "full":
            delta, delta_se = paired_difference(result.scores, full.scores)
        wall = None
        if result.new_tokens and full is not None and full.new_tokens:
            wall = full.seconds / result.seconds
        m = result.metrics[metric]
        return Cell(
            method, target, result.task, metric, m.value, m.se, m.n, result.compute_ratio, delta, delta_se, wall,
            request, {k: asdict(v) for k, v in result.metrics.items()},
        )  # fmt: skip

    def _dash_decider(self, policy, key: str, target: float) -> tuple[object, float, str]:
        """The policy's decider at `target`, its request corrected once from a measurement on WikiText-2."""
        request = target
        if self.spec.match:
            settings = TaskSettings(limit=min(10, self.spec.limits.get("wikitext2") or 10))
            probe = run_task(
                self.dm.engine, self.dm.tokenizer, "wikitext2", policy.decider(target, self.spec.mode), self.dm.costs,
                settings, self.spec.data_dir, self._cache(f"{key}-{target}-probe", "wikitext2"), progress=False,
                run={"method": key, "request": target},
            )  # fmt: skip
            request = min(target * target / probe.compute_ratio, policy.max_speedup())
        return policy.decider(request, self.spec.mode), request, f"{key}-{request:.4f}"

    def _key(self, method: str, target: float) -> str:
        """What identifies a method's configuration in the per-example caches: the files it was built from."""
        if method == "rl-adapter":
            return f"rl-adapter-{_file_hash(self.spec.rl_adapter)}-{target}"
        return f"{method}-{target}-seed{self.spec.seed}"

    def _deciders(self, target: float) -> Iterator[tuple[str, object, float | None, str, object, object]]:
        """(method, decider or the reason it cannot reach `target`, request, cache key, skip scales, engine)."""
        scales = self.dm.engine.scales
        options = MethodOptions(seed=self.spec.seed, rl_adapter=self.spec.rl_adapter)
        for method in self.spec.methods:
            if method == "full":
                continue
            if method == "dash":
                key = f"dash-{self._dash_hash}-{self.spec.mode or 'default'}"
                yield method, *self._dash_decider(self.dm.policy, key, target), scales, None
                continue
            try:
                built = build(self.context, method, target, options)
            except DashskipError as exc:
                yield method, _unreachable(exc), None, self._key(method, target), scales, None
                continue
            own = built.engine is not None  # an engine of its own runs with its own scales
            yield method, built.decider, None, self._key(method, target), None if own else scales, built.engine
        for label, policy in self.variants.items():
            with _scales(self.dm.engine, policy.scales()):
                found = self._dash_decider(policy, f"{label}-{_file_hash(self.spec.variants[label])}", target)
            yield label, *found, policy.scales(), None

    def run(self) -> list[Cell]:
        spec = self.spec
        for task in spec.tasks:
            self.full[task] = self._run("full", task, None)
            self.cells.append(self._cell("full", 1.0, self.full[task]))
        for target in tqdm(spec.speedups, desc="operating points", disable=not self.progress):
            for method, decider, request, key, scales, engine in self._deciders(target):
                if isinstance(decider, str):
                    self.cells += [
                        Cell(method, target, t, "", math.nan, math.nan, 0, math.nan, unreachable=decider)
                        for t in spec.tasks
                    ]
                    continue
                with _scales(self.dm.engine, scales if scales is not None else self.dm.engine.scales):
                    for task in spec.tasks:
                        self.cells.append(self._cell(method, target, self._run(key, task, decider, engine), request))
            self.write()  # after every operating point: a long sweep leaves its tables as it goes
        if spec.plots:
            self.plot()
        return self.cells

    def write(self) -> None:
        out = self.spec.out
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": self.spec.model,
            "fingerprint": self.dm.fingerprint,
            "limits": self.spec.limits,
            "cost_table": self.dm.costs.decode,
            "cost_table_measured": self.dm.costs.measured,
        }
        atomic_write_text(
            out / "results.json", json.dumps({"meta": meta, "cells": [asdict(c) for c in self.cells]}, indent=1)
        )
        with (out / "results.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[k for k in asdict(self.cells[0]) if k != "metrics"])
            writer.writeheader()
            for c in self.cells:
                writer.writerow({k: v for k, v in asdict(c).items() if k != "metrics"})
        atomic_write_text(out / "table.md", markdown_table(self.cells, self.spec, self.dm.costs.decode))

    def plot(self) -> None:
        from dashskip.eval.plots import pareto_plot, state_map_plot

        pareto_plot(self.cells, self.spec.out / "pareto.png", self.spec.model)
        if "dash" in self.spec.methods:
            decide = {
                t: self._dash_decider(self.dm.policy, f"dash-{self._dash_hash}", t)[0] for t in self.spec.speedups
            }
            cosine = calibration_for(self.context).cosine
            state_map_plot(self.dm, decide, cosine, self.spec.out / "state_map.png", self.spec.data_dir)


def format_cell(c: Cell) -> str:
    if c.unreachable:
        return "unreachable"
    if c.metric == "ppl":
        text = f"{c.value:.2f} ± {c.se:.2f}"
    elif c.metric.startswith("rouge"):
        text = f"{c.value:.1f} ± {c.se:.1f}"
    else:
        text = f"{100 * c.value:.1f} ± {100 * c.se:.1f}"
    extra = f" ({c.compute_ratio:.2f}x" + (f", wall {c.wall_ratio:.2f}x" if c.wall_ratio else "") + ")"
    return text + (extra if c.method != "full" else "")


def markdown_table(cells: list[Cell], spec: SweepSpec, costs: dict[int, float]) -> str:
    tasks = spec.tasks
    metric = {c.task: c.metric for c in cells if c.method == "full"}
    header = "| method | " + " | ".join(f"{t} {metric.get(t, '')}" for t in tasks) + " |"
    lines = []
    for target in [1.0, *spec.speedups]:
        rows = [c for c in cells if c.target == target]
        if not rows:
            continue
        title = "full model" if target == 1.0 else f"{target}x requested"
        lines += [f"\n**{title}**\n", header, "|---|" + "---|" * len(tasks)]
        for method in dict.fromkeys(c.method for c in rows):
            by_task = {c.task: c for c in rows if c.method == method}
            lines.append(
                f"| {method} | " + " | ".join(format_cell(by_task[t]) if t in by_task else "" for t in tasks) + " |"
            )
    n = {c.task: c.n for c in cells if c.method == "full"}
    notes = (
        "\nCells: score ± SE over examples (measured compute ratio; for generation also 'wall': the full model's "
        "wall time per example over this method's, prefill + decode on the same prompts, as measured when each "
        "example ran, so under whatever load the machine had then; docs/benchmarks.md has clean speed numbers). "
        "acc / acc_norm in %, ROUGE x 100. Examples per task: "
        + ", ".join(f"{t} {n.get(t)}" for t in tasks)
        + ". Paired differences to the full model with their SEs are in results.json (`delta`, `delta_se`). "
        + "Compute ratios use the decode cost table (relative to a full layer) "
        + ", ".join(f"{states.spec(k).name} {v:.3f}" for k, v in sorted(costs.items()))
        + ".\n"
    )
    return "\n".join(lines) + "\n" + notes
