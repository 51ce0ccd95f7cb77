"""The all-full path against transformers on the real embedded models (both run in CI, kept short)."""

import pytest
import torch

from dashskip.data import load_text, token_windows
from tests.conftest import assert_greedy_agrees, within_reach

pytestmark = pytest.mark.real

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "In 1905, Albert Einstein published",
    "The three primary colors are",
    "Once upon a time, in a small village,",
]


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def real(request):
    """The session's model (its transformers model, tokenizer and DashModel); the full path is checked here."""
    dm = request.getfixturevalue("smollm2" if request.param == "smollm2-135m" else "gemma3")
    return dm.model, dm.tokenizer, dm


def test_full_path_logits_match_transformers(real):
    model, tok, dm = real
    ids = tok(PROMPTS[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
    session = dm.engine.new_session(1)
    ours = dm.backbone.logits(dm.engine.step(ids, session).hidden)
    assert float((ours - ref).norm() / ref.norm()) < 1e-4


def test_decode_past_gemmas_sliding_window_matches_transformers(gemma3):
    """Decode steps past Gemma-3's 512-token sliding window, on the compiled windowed attention: each step's logits
    are transformers' for the whole sequence at that position (its local layers then see only the last 512 keys)."""
    window = gemma3.backbone.config.sliding_window
    ids = token_windows(gemma3.tokenizer, load_text("wikitext2"), 1, window + 12, seed=3)
    with torch.no_grad():
        ref = gemma3.model(ids).logits[0]
    session = gemma3.engine.new_session(1)
    gemma3.engine.step(ids[:, : window - 2], session)
    for t in range(window - 2, ids.shape[1]):  # from inside the window to 12 keys past it
        ours = gemma3.backbone.logits(gemma3.engine.step(ids[:, t : t + 1], session).hidden)[0, -1]
        assert float((ours - ref[t]).norm() / ref[t].norm()) < 1e-4, f"position {t}"


# Gemma-3's 5 x 64 greedy tokens (~1 minute of transformers generate over its 262k-word head) run in the slow set;
# the default run checks 2 x 16 of them (~10 s), and SmolLM2's 5 x 64.
@pytest.mark.parametrize(
    "real, prompts, tokens",
    [
        ("smollm2-135m", 5, 64),
        ("gemma3-270m", 2, 16),
        pytest.param("gemma3-270m", 5, 64, marks=pytest.mark.slow),
    ],
    indirect=["real"],
)
def test_full_path_greedy_generation_is_token_identical(real, prompts, tokens):
    model, tok, dm = real
    for prompt in PROMPTS[:prompts]:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        ref = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        ours = dm.generate(ids, max_new_tokens=tokens)
        with torch.no_grad():
            logits = model(ref).logits[0]
        assert_greedy_agrees(ours[0], ref[0], logits, prompt)


def test_shipped_policy_holds_its_operating_point_on_held_out_text(smollm2):
    """The ratio asked for is what held-out text of the training distribution gets, +-3%.

    Training used the first 90% of the WikiText-2 validation tokens and calibrated the operating points on the
    first 12 windows of the tail; these are 8 later windows of the tail, seen by neither. (On the raw test split
    the same operating points land 5-8% low: docs/results.md.)
    """

    from dashskip.eval.evaluation import perplexity

    dm = smollm2
    ids = dm.tokenizer(load_text("wikitext2-valid"), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    tail = ids[int(ids.numel() * 0.9) :]
    windows = tail[40 * 256 : 48 * 256].view(8, 256)
    # 1.3, well inside the wall-clock reach on every host seen (1.53-1.8): at 1.5 a fresh host's table asked for
    # ratio 2.24, near the policy's top (2.34), where this text gave 2.12
    point = dm.operating_point(within_reach(dm, 1.3))
    result = perplexity(dm.engine, windows, dm.decider_for(point), dm.costs, progress=False)
    # 1.3 is decode wall clock on this machine: the cost table resolved it to a compute ratio, which the text meets
    assert point.ratio > point.asked and result.compute_ratio == pytest.approx(point.ratio, rel=0.03)


def test_rate_control_holds_the_operating_point_where_the_fixed_bias_misses_it(smollm2):
    """On a chat prompt and a code prompt the calibrated bias of 1.67x lands more than 10% low; with the
    controller on, each generated sequence reports 1.67x +-3% (benchmarks/operating_points.py has more inputs)."""
    from dashskip.models.chat import chat_input_ids

    dm = smollm2
    chat = chat_input_ids(dm.tokenizer, [{"role": "user", "content": "Give me three tips for a job interview."}])
    code = dm.tokenizer('def merge_intervals(intervals):\n    """Merge overlapping intervals."""\n')["input_ids"]
    for ids in (chat, code):
        ratios = {}
        for control in (False, True):
            out = dm.generate(torch.tensor([ids]), max_new_tokens=40, eos_token_id=[], return_dict_in_generate=True,
                              decider=dm.policy.decider(1.67, control=control))  # fmt: skip
            ratios[control] = dm.policy.cost_table().compute_ratio(out.states)  # the table the controller steers
        assert ratios[False] < 1.67 * 0.9, ratios
        assert abs(ratios[True] / 1.67 - 1) < 0.03, ratios


def test_rate_control_holds_each_scored_window_at_the_operating_point(smollm2):
    """ARC-Easy questions scored as windows: the calibrated bias lands 12-26% below 1.67x; with control each
    window is rescored with a corrected bias until it is within 1% (at most 8 passes)."""
    from dashskip.data import load_choice_questions

    dm = smollm2
    for item in load_choice_questions("arc-easy")[:4]:
        ids = dm.tokenizer(item.context + " " + item.choices[0], return_tensors="pt")["input_ids"]
        costs = dm.policy.cost_table()  # the policy's own: compute ratios, the table its controller steers on
        fixed = costs.compute_ratio(dm.engine.score(ids, dm.policy.decider(1.67, control=False)).states)
        held = costs.compute_ratio(dm.engine.score(ids, dm.policy.decider(1.67)).states)
        assert fixed < 1.67 * 0.9 and abs(held / 1.67 - 1) < 0.03, (fixed, held)
