"""Hindsight oracles: the Lagrangian pick is optimal at its own budget, granularities differ where they should,
and the ladder's NLLs are the engine's."""

import itertools

import pytest
import torch

from dashskip import Backbone, Engine
from dashskip.core.costs import CostTable
from dashskip.errors import DashskipError
from dashskip.eval import oracle as oracle_module
from dashskip.eval.evaluation import token_nll
from dashskip.eval.oracle import kept_ladder_scores, ladder_scores, lagrangian_choice, oracle, schedule_ladder
from tests.conftest import tiny_model
from tests.test_baselines import COSTS, synthetic


def test_lagrangian_choice_is_the_best_assignment_within_its_budget():
    gen = torch.Generator().manual_seed(0)
    loss = torch.rand(6, 3, generator=gen, dtype=torch.float64)
    cost = torch.tensor([1.0, 2.0, 3.5], dtype=torch.float64)
    for budget in (1.2, 1.9, 2.6, 3.4):
        choice = lagrangian_choice(loss, cost, budget)
        spent = float(cost[choice].mean())
        assert spent <= budget + 1e-9
        got = float(loss.gather(1, choice[:, None]).sum())
        brute = min(  # every assignment that costs no more than the one found
            sum(float(loss[u, o]) for u, o in enumerate(pick))
            for pick in itertools.product(range(3), repeat=6)
            if float(cost[list(pick)].mean()) <= spent + 1e-9
        )
        assert got == pytest.approx(brute)
    with pytest.raises(DashskipError, match="no schedule is as cheap"):
        lagrangian_choice(loss, cost, 0.5)


def test_per_token_choice_spends_compute_on_the_hard_tokens():
    # two schedules: cheap (cost 1) and dear (cost 3) over 2 windows x 4 tokens; the cheap one loses only on the
    # odd tokens. At a budget of 2 full layers per token one schedule for all must be the cheap one; per token,
    # the dear one goes to exactly the tokens where it helps.
    dear = torch.ones(2, 4, dtype=torch.float64)
    cheap = dear.clone()
    cheap[:, 1::2] += 1.0
    nll, cost = torch.stack([dear, cheap]), torch.tensor([3.0, 1.0])
    static = oracle(nll, cost, 3, 1.5, "schedule")
    assert static.window_nll == pytest.approx([1.5, 1.5]) and static.ratio == pytest.approx(3.0)
    per_token = oracle(nll, cost, 3, 1.5, "token")
    assert per_token.window_nll == pytest.approx([1.0, 1.0]) and per_token.ratio == pytest.approx(1.5)
    per_window = oracle(nll, cost, 3, 1.5, "window")  # both windows alike: no window is worth the dear schedule
    assert per_window.window_nll == pytest.approx([1.5, 1.5])


def test_ladder_starts_at_full_and_its_nlls_are_the_engines():
    ladder = schedule_ladder(synthetic(4), COSTS, {"int8": (2,), "mixed-skip": (0, 1, 2)}, [1.2, 1.6, 2.0, 9.0])
    assert ladder[0] == [4] * 6 and len({tuple(s) for s in ladder}) == len(ladder) > 3
    engine = Engine(Backbone(tiny_model("llama")))
    windows = torch.randint(3, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    nll, kl = ladder_scores(engine, windows, ladder[:3], batch=2)
    assert nll.shape == kl.shape == (3, 3, 9)
    with torch.no_grad():
        reference = token_nll(engine.backbone.logits(engine.score(windows, None).hidden), windows)
    torch.testing.assert_close(nll[0], reference.double(), rtol=1e-5, atol=1e-5)
    assert float(kl[0].abs().max()) < 1e-5 and float(kl[-1].min()) > 0  # full is the reference; cheaper moves it
    assert not torch.allclose(nll[0], nll[-1])
    assert CostTable.default().token_costs(torch.tensor(ladder)).shape == (len(ladder),)


def test_kept_scores_are_reused_per_schedule_and_only_for_the_same_model_and_windows(tmp_path, monkeypatch):
    ladder = schedule_ladder(synthetic(4), COSTS, {"int8": (2,), "mixed-skip": (0, 1, 2)}, [1.2, 1.6, 2.0, 9.0])[:4]
    engine = Engine(Backbone(tiny_model("llama")))
    windows = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    scored = []
    real = oracle_module.ladder_scores

    def counting(e, w, lad, **kwargs):
        scored.append(len(lad))
        return real(e, w, lad)

    monkeypatch.setattr(oracle_module, "ladder_scores", counting)
    path = tmp_path / "ladder.safetensors"
    first = kept_ladder_scores(engine, windows, ladder[:3], path, "model-a")
    again = kept_ladder_scores(engine, windows, ladder[1:], path, "model-a")  # two seen, one new
    assert scored == [3, 1]
    torch.testing.assert_close(again[0][:2], first[0][1:])
    torch.testing.assert_close(again[1][:2], first[1][1:])
    torch.testing.assert_close(again[0], real(engine, windows, ladder[1:])[0])
    kept_ladder_scores(engine, windows, ladder[:2], path, "model-a")
    assert scored == [3, 1]  # all four are kept now: nothing scored
    kept_ladder_scores(engine, windows, ladder[:2], path, "model-b")  # another model: scored again, file replaced
    kept_ladder_scores(engine, windows[:1], ladder[:2], path, "model-b")  # other windows: the same
    assert scored == [3, 1, 2, 2]


def test_fidelity_criterion_picks_by_closeness_to_full_not_by_luck():
    # the cheap schedule is luckily right on token 0 (NLL below the dear one's) but moves the prediction far
    # there; on token 1 it is harmless. Chosen by NLL, token 0 goes cheap; chosen by KL, token 1 does.
    nll = torch.tensor([[[1.0, 1.0]], [[0.5, 1.0]]], dtype=torch.float64)
    kl = torch.tensor([[[0.0, 0.0]], [[0.8, 0.01]]], dtype=torch.float64)
    cost = torch.tensor([3.0, 1.0])
    assert oracle(nll, cost, 3, 1.5, "token").window_nll == pytest.approx([0.75])
    assert oracle(nll, cost, 3, 1.5, "token", criterion=kl).window_nll == pytest.approx([1.0])


def test_perplexity_plot_marks_a_collapse_instead_of_scaling_to_it(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from dashskip.eval.plots import perplexity_lines

    limits = []
    save = Figure.savefig

    def recording(fig, *args, **kwargs):
        limits.append(fig.axes[0].get_ylim())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    rows = [{"name": "static int8", "s": s, "ppl": 31.5, "ppl_se": 2.0} for s in (1.2, 1.4)]
    rows.append({"name": "static mixed-skip", "s": 1.7, "ppl": 305.0, "ppl_se": 26.0})
    perplexity_lines(rows, "s", tmp_path / "capped.png", "speedup", "t", cap=36.0)
    perplexity_lines(rows, "s", tmp_path / "scaled.png", "speedup", "t")
    assert limits[0][1] == 36.0 and limits[0][0] < 29.5  # the differences that matter keep the axis
    assert limits[1][1] > 305.0  # without a cap the collapse sets the scale
    assert all((tmp_path / f).read_bytes()[:4] == b"\x89PNG" for f in ("capped.png", "scaled.png"))
