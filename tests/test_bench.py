"""The speed machinery: weight-byte accounting, decision timing, batch-majority voting, the GEMM path of the
quantized states, the head precisions, and the `bench` command end to end (no timing asserts)."""

import json

import pytest
import torch

from dashskip import Backbone, DashModel, Engine
from dashskip.core.decisions import BatchMajority, Decider, StepInfo, TimedDecider, TokenStates
from dashskip.core.states import spec
from dashskip.errors import DashskipError
from dashskip.eval import bench
from dashskip.eval.bench import bytes_per_step, check_bench_args, head_bytes, layer_bytes
from tests.conftest import tiny_model


def test_weight_bytes_count_each_state_once_per_layer_and_step():
    bb = Backbone(tiny_model("llama"))
    per = layer_bytes(bb)
    full_layer = sum(p.numel() * 4 for n, p in bb.hf_layers[1].named_parameters() if "proj" in n)
    assert per[4][1] == full_layer
    k_v = sum(
        p.numel() * 4 for n, p in bb.hf_layers[1].named_parameters() if n.endswith(("k_proj.weight", "v_proj.weight"))
    )
    assert per[0][1] == k_v  # a skipped layer still projects K/V
    assert per[2][1] < full_layer / 3 and per[1][1] < per[2][1]
    head = bb.lm_head.weight.numel() * 4
    assert head_bytes(bb) == head
    states = torch.full((2, 3, 6), 4, dtype=torch.int8)
    states[0, :, 2] = 2  # two rows in different states read both copies of layer 2
    expected = sum(per[4]) + per[2][2] + head
    assert bytes_per_step(bb, states) == pytest.approx(expected)
    bb.set_head("int8")
    assert head_bytes(bb) < head / 3


def test_timed_decider_counts_decode_steps_only():
    timed = TimedDecider(Decider())
    info = dict(positions=torch.zeros(1, 1, dtype=torch.long), num_layers=6)
    timed.begin(StepInfo(prefill=True, **info))
    timed(1, torch.zeros(1, 1, 4), 4)
    assert timed.seconds == 0 and timed.steps == 0
    for _ in range(3):
        timed.begin(StepInfo(prefill=False, **info))
        timed(1, torch.zeros(1, 1, 4), 4)
    assert timed.steps == 3 and timed.seconds > 0


def test_batch_majority_gives_every_row_the_most_common_state_ties_to_precision():
    answers = torch.tensor([[0, 2, 1], [0, 4, 1], [2, 2, 4], [0, 4, 4]])  # (batch 4, tokens 3)
    vote = BatchMajority(TokenStates(lambda layer, positions: answers))
    vote.begin(StepInfo(positions=torch.zeros(4, 3, dtype=torch.long), prefill=False, num_layers=6))
    out = vote(2, torch.zeros(4, 3, 8), 4)
    assert torch.equal(out, torch.tensor([[0, 4, 4]]).expand(4, 3))  # 2 vs 2 ties go to the more precise state
    # rows that do not vote (held in full, requests at 1.0x) leave the vote to the others
    for voters, expected in (([False, False, True, True], [2, 4, 4]), ([True, False, True, False], [2, 2, 4])):
        vote = BatchMajority(TokenStates(lambda layer, positions: answers), torch.tensor(voters)[:, None])
        vote.begin(StepInfo(positions=torch.zeros(4, 3, dtype=torch.long), prefill=False, num_layers=6))
        assert torch.equal(vote(2, torch.zeros(4, 3, 8), 4), torch.tensor([expected]).expand(4, 3))


def test_batch_majority_runs_uniform_layers_in_the_engine():
    model = tiny_model("llama")
    eng = Engine(Backbone(model))
    ids = torch.randint(3, 97, (3, 5), generator=torch.Generator().manual_seed(0))
    rows = TokenStates(lambda layer, positions: torch.tensor([[0], [2], [0]]).expand(3, 5))
    result = eng.step(ids, eng.new_session(3), BatchMajority(rows))
    assert result.states[..., 1:-1].eq(0).all()


@pytest.mark.parametrize("state", [1, 2])
def test_gemm_path_of_quantized_states_matches_the_kernel_path(state):
    torch.manual_seed(0)
    handler = spec(state).handler
    form = handler.quantize([torch.randn(96, 128)])
    x = torch.randn(67, 128)
    kernel = handler.run("torch", handler.prepare("torch", form), x, 96)  # torch's weight-only kernel
    batched = handler.run("gemm", handler.prepare("gemm", form), x, 96)  # dequantized bf16 weights, one GEMM
    assert float((batched - kernel).norm() / kernel.norm()) < 5e-3


def test_head_precisions_stay_close_to_the_full_head_and_bad_names_are_refused():
    bb = Backbone(tiny_model("llama"))
    h = torch.randn(2, 3, 64)
    full = bb.logits(h)
    for precision, bound in (("bf16", 1e-2), ("int8", 2e-2)):
        bb.set_head(precision)
        assert float((bb.logits(h) - full).norm() / full.norm()) < bound
    bb.set_head("full")
    assert torch.equal(bb.logits(h), full)
    with pytest.raises(DashskipError, match="unknown head precision 'fp8'"):
        bb.set_head("fp8")


def test_decode_is_timed_inside_each_run_so_prefill_noise_stays_out(monkeypatch):
    """A clock that ticks as the run says: prefill = start to the first new token, decode = the steps after it,
    whatever the prefill took in each run (the old difference of two runs' totals put its noise into decode)."""
    now = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    prefill_s = iter([0.5, 0.1, 0.9, 0.3])  # warm-up, then three runs whose prefill varies 9x

    def run(n: int, clock: bench.TokenClock) -> None:
        clock.put("prompt")
        now[0] += next(prefill_s)
        for _ in range(n):
            clock.put("token")
            now[0] += 0.008  # each decode step: 8 ms

    prefill, decode = bench.prefill_and_decode_ms(run, new_tokens=5, repeats=3)
    assert prefill == pytest.approx(300.0) and decode == pytest.approx(8.0)
    with pytest.raises(DashskipError, match="at least 2 new tokens"):
        bench.prefill_and_decode_ms(lambda n, clock: clock.put("prompt"), new_tokens=1, repeats=1)


def test_bench_arguments_are_checked():
    with pytest.raises(DashskipError, match="new-tokens must be >= 2"):
        check_bench_args(1, 8, 1, 3)
    with pytest.raises(DashskipError, match="batch and prompt length"):
        check_bench_args(0, 8, 4, 3)


@pytest.mark.real
def test_bench_command_runs_three_configurations_side_by_side(tmp_path, smollm2):
    from typer.testing import CliRunner

    from dashskip.cli import app

    out = tmp_path / "bench.json"
    args = ["bench", "--method", "int8", "--prompt-len", "8", "--new-tokens", "3", "--repeats", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "transformers generate" in result.output and "engine, full" in result.output
    data = json.loads(out.read_text())
    names = [row["name"] for row in data["rows"]]
    assert len(names) == 3 and "int8" in names[2]
    int8 = data["rows"][2]
    # static INT8 on SmolLM2's inner layers, on the table `bench` ran with (the model's own: no policy at 1.0x)
    expected = DashModel(smollm2.model, smollm2.tokenizer).costs.compute_ratio(torch.tensor([4] + [2] * 28 + [4]))
    assert int8["compute_ratio"] == pytest.approx(expected, rel=0.03)
    assert int8["weight_mb_per_step"] < data["rows"][1]["weight_mb_per_step"] / 2
    # one repetition of 3 tokens on a shared host: the fraction itself is noise (3.3 seen), its arithmetic is not
    full, bandwidth = data["rows"][1], data["bandwidth_gbs"]
    assert bandwidth > 0 and full["bandwidth_fraction"] == pytest.approx(
        full["weight_read_gbs"] / bandwidth, rel=0.02, abs=2e-3
    )
    assert set(data["ratios"]) >= {"decode_vs_engine_full", "decode_vs_transformers", "prefill_vs_engine_full"}


@pytest.mark.real
def test_bench_runs_the_outer_layers_quantized_only_where_asked(tmp_path, smollm2):
    """`--quantized-outer` puts the first and last layer in the method's state too (llama.cpp's Q8_0 quantizes
    every layer): the row's compute ratio is that schedule's on the table bench ran with; other methods refuse it."""
    from typer.testing import CliRunner

    from dashskip.cli import app

    out = tmp_path / "bench.json"
    args = ["bench", "--method", "int8", "--quantized-outer", "--prompt-len", "8", "--new-tokens", "3", "--repeats",
            "1", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["rows"][2]
    assert "int8 every layer" in row["name"]
    costs = DashModel(smollm2.model, smollm2.tokenizer).costs
    every, inner = (costs.compute_ratio(torch.tensor(s)) for s in ([2] * 30, [4] + [2] * 28 + [4]))
    assert row["compute_ratio"] == pytest.approx(every, rel=2e-3)
    assert row["compute_ratio"] != pytest.approx(inner, rel=2e-3)
    refused = CliRunner().invoke(app, ["bench", "--method", "dash", "--quantized-outer"])
    assert isinstance(refused.exception, DashskipError) and "applies to --method int8 or int4" in str(refused.exception)
