"""`dashskip sweep` end to end on a tiny model folder: cells, paired differences, files, resume, clear errors."""

from __future__ import annotations

import json
import math
import re

import pytest
from transformers import AutoTokenizer

from dashskip.errors import DashskipError
from dashskip.eval.sweep import Cell, Sweep, SweepSpec, markdown_table, parse_limits
from dashskip.models.loading import resolve
from tests.conftest import tiny_policy, tiny_smol


@pytest.fixture(scope="module")
def setup(tmp_path_factory, monkeypatch_module):
    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    root = tmp_path_factory.mktemp("sweep")
    monkeypatch_module.setenv("DASHSKIP_CACHE", str(root / "cache"))
    model = tiny_smol(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    tiny_policy(model).save(root / "policy.safetensors")
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def spec(root, **kw) -> SweepSpec:
    base = dict(
        model=str(root / "model"),
        methods=["dash", "int8", "random"],
        speedups=[1.33, 1.67],
        tasks=["wikitext2", "arc-easy"],
        limits={"wikitext2": 3, "arc-easy": 3},
        out=root / "out",
        policy=str(root / "policy.safetensors"),
        plots=True,
    )
    return SweepSpec(**{**base, **kw})


def test_sweep_writes_every_cell_and_resumes(setup):
    cells = Sweep(spec(setup), progress=False).run()
    out = setup / "out"
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.csv", "table.md", "pareto.png", "state_map.png"}
    # full on both tasks + 3 methods x 2 operating points x 2 tasks
    assert len(cells) == 2 + 3 * 2 * 2
    full = {c.task: c for c in cells if c.method == "full"}
    assert full["wikitext2"].n == 3 and full["arc-easy"].n == 3 and full["wikitext2"].compute_ratio == pytest.approx(1)
    for c in cells:
        if not c.unreachable and c.method != "full":
            # ratios are measured on the run, not copied from the request, and meet it: DASH by rate control,
            # random skipping by its drawn rate, static INT8 by its schedule
            assert c.compute_ratio == pytest.approx(c.target, rel=0.03), (c.method, c.target, c.task)
    assert {c.method for c in cells if not c.unreachable} == {"full", "dash", "int8", "random"}
    table = (out / "table.md").read_text()
    assert "| full |" in table and "1.67x requested" in table and "| dash |" in table
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["cells"]) == len(cells)
    before = {(c.method, c.target, c.task): c.value for c in cells}
    again = Sweep(spec(setup), progress=False).run()  # from the per-example cache
    assert {(c.method, c.target, c.task): c.value for c in again} == before


def test_paired_difference_is_the_mean_per_example_difference(setup):
    sweep = Sweep(spec(setup, methods=["int8"], speedups=[1.33], tasks=["wikitext2"], plots=False), progress=False)
    cells = sweep.run()
    cell = next(c for c in cells if c.method == "int8")
    full = sweep.full["wikitext2"]
    result_cache = sweep._cache("int8-1.33-seed0", "wikitext2")
    rows = [json.loads(line) for line in result_cache.read_text().splitlines()[1:]]  # after the header
    diffs = [r["nll"] - f for r, f in zip(sorted(rows, key=lambda r: r["index"]), full.scores, strict=True)]
    assert cell.delta == pytest.approx(sum(diffs) / len(diffs))
    mean = sum(diffs) / len(diffs)
    assert cell.delta_se == pytest.approx(
        math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    )


def test_limits_and_bad_specs():
    assert parse_limits("7")["arc-easy"] == 7 and parse_limits("arc-easy=5")["arc-easy"] == 5
    assert parse_limits("arc-easy=5")["wikitext2"] == 40
    with pytest.raises(DashskipError, match="task=N"):
        parse_limits("arc-easy=many")
    with pytest.raises(DashskipError, match="unknown task"):
        SweepSpec("m", ["dash"], [2.0], ["squad"], {}, None).check()
    with pytest.raises(DashskipError, match="> 1.0"):
        SweepSpec("m", ["dash"], [1.0], ["wikitext2"], {}, None).check()


def test_table_marks_unreachable_cells():
    cells = [
        Cell("full", 1.0, "wikitext2", "ppl", 40.0, 2.0, 40, 1.0),
        Cell("int4", 2.0, "wikitext2", "", math.nan, math.nan, 0, math.nan, unreachable="up to 1.8"),
        Cell("dash", 2.0, "wikitext2", "ppl", 45.5, 2.5, 40, 1.98),
    ]
    costs = {0: 0.17, 1: 0.36, 2: 0.45, 4: 1.0}
    text = markdown_table(cells, SweepSpec("m", ["int4", "dash"], [2.0], ["wikitext2"], {}, None), costs)
    assert "skip 0.170, int4 0.360, int8 0.450, full 1.000" in text
    assert "| int4 | unreachable |" in text and "45.50 ± 2.50 (1.98x)" in text and "| full | 40.00 ± 2.00 |" in text


def test_cli_eval_task_and_sweep(setup):
    from typer.testing import CliRunner

    from dashskip.cli import app

    runner = CliRunner()
    model = str(setup / "model")
    # The tiny model's cost table is measured on the host, and how far random skipping reaches varies with it
    # (1.13 to 1.4 on CI hosts seen: a tiny layer's skip, which still projects K/V, costs much of it). So an
    # unreachable request must name the reach in one line, and a request inside that reach must be met.
    args = ["--method", "random", "--task", "sst2", "--limit", "3", "--json"]
    refused = runner.invoke(app, ["eval", "--model", model, *args, "--speedup", "9"])
    assert isinstance(refused.exception, DashskipError), refused.output
    named = re.search(r"up to (\d+\.\d+)", str(refused.exception))
    assert named, f"the refusal names no reach: {refused.exception}"
    top = float(named.group(1))
    target = round(1 + (top - 1) / 2, 2)
    result = runner.invoke(app, ["eval", "--model", model, *args, "--speedup", str(target)])
    assert result.exit_code == 0, result.output
    json_line = next(line for line in result.output.splitlines() if '{"model"' in line)  # after progress bars
    row = json.loads(json_line[json_line.index('{"model"') :])
    assert row["task"] == "sst2" and row["examples"] == 3
    assert row["compute_ratio"] == pytest.approx(target, rel=0.03)
    out = setup / "cli-sweep"
    args = ["--methods", "random", "--speedups", "1.33", "--tasks", "rte", "--limit", "2", "--no-plots"]
    result = runner.invoke(app, ["sweep", "--model", model, *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| random |" in (out / "table.md").read_text()
    bad = runner.invoke(app, ["sweep", "--model", model, "--speedups", "fast", "--out", str(out)])
    assert isinstance(bad.exception, DashskipError) and "comma-separated numbers" in str(bad.exception)


def test_eval_places_dash_and_the_baselines_on_one_table(setup):
    """`dashskip eval` runs every method on this host's measured cost table (docs/policy.md): DASH's row names the
    same table as a baseline's, not the table its policy file was calibrated with (an unmeasured one here)."""
    from dashskip.eval.run import evaluate

    common = dict(model=str(setup / "model"), policy=str(setup / "policy.safetensors"), data_dir=None, limit=1)
    dash = evaluate(method="dash", speedup=1.1, **common)
    full = evaluate(method="full", speedup=1.0, **common)
    assert dash["cost_table"] == full["cost_table"]
    assert dash["cost_table"]["measured"]  # the policy's own table says it was not
    # and DASH's decider steers its rate on that table, not on the policy's
    from dashskip.api import from_pretrained
    from dashskip.measure.profiling import cost_table_for
    from dashskip.methods import build

    dm = from_pretrained(common["model"], policy=common["policy"], wall_clock=False)
    host = cost_table_for(dm.engine, dm.fingerprint)
    decider = build(dm.method_context(costs=host), "dash", 1.1).decider
    assert decider.sequence.control.costs is host and host.decode != dm.policy.cost_table().decode
