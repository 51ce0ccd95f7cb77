"""Evaluation tasks: loaders, lm-eval's tokenization split, scores against the model's own logits, metrics by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dashskip.api import DashModel
from dashskip.data import ChoiceItem, SummaryItem, load_choice_questions, load_summaries, load_text
from dashskip.eval.evaluation import perplexity, perplexity_windows
from dashskip.eval.tasks import (
    ExampleCache,
    TaskSettings,
    choice_logliks,
    encode_pair,
    first_line,
    mean_and_se,
    rouge_scores,
    run_task,
    summary_prompt,
)
from dashskip.eval.tasks import _choice_metrics as choice_metrics
from tests.conftest import tiny_smol


@pytest.fixture(scope="module")
def dm(tokenizer) -> DashModel:
    return DashModel(tiny_smol(tokenizer), tokenizer)


@pytest.mark.parametrize(
    "task,count",
    [("arc-easy", 2376), ("arc-challenge", 1172), ("hellaswag", 10042), ("mmlu", 14042), ("sst2", 872), ("rte", 277)],
)
def test_choice_sets_load_every_item(task, count):
    items = load_choice_questions(task)
    assert len(items) == count
    assert all(0 <= it.label < len(it.choices) and all(c.startswith(" ") for c in it.choices) for it in items[:50])


def test_mmlu_is_five_shot_and_its_first_items_cover_every_subject():
    items = load_choice_questions("mmlu")
    headers = {it.context.split("\n\n")[0] for it in items[:57]}
    assert len(headers) == 57
    assert items[0].context.count("\nAnswer: ") == 5 and items[0].context.endswith("\nAnswer:")


def test_summaries_load():
    assert len(load_summaries("xsum")) == 1000 and len(load_summaries("cnn-dailymail")) == 10
    assert not load_summaries("xsum")[0].document.startswith("###")


def test_encode_pair_moves_trailing_space_to_the_answer(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: 2+2?\nAnswer: ", "4")
    assert ctx == tokenizer("Question: 2+2?\nAnswer:")["input_ids"]
    assert ctx + cont == tokenizer("Question: 2+2?\nAnswer: 4")["input_ids"]


def _reference_loglik(model, tokenizer, context: str, continuation: str) -> float:
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(sum(logprobs[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))


@pytest.mark.parametrize(
    "item",
    [
        ChoiceItem("The capital of France is", [" Paris, of course", " a city", " Lyon on the Rhône river"], 0),
        ChoiceItem("Is this good?\nAnswer:", [" yes", " no"], 1),  # one token each: one shared pass
    ],
)
def test_choice_logliks_equal_the_models_own(dm, tokenizer, item):
    scores, cost, tokens = choice_logliks(dm.engine, tokenizer, item, None, dm.costs, 2048)
    with torch.no_grad():
        expected = [_reference_loglik(dm.model, tokenizer, item.context, c) for c in item.choices]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert cost == pytest.approx(tokens * dm.backbone.num_layers)  # every layer in full


def test_accuracy_metrics_by_hand():
    rows = [
        {"ll": [-1.0, -2.0], "chars": [1, 1], "label": 0},  # right both ways
        {"ll": [-3.0, -2.0], "chars": [10, 2], "label": 0},  # acc wrong; per char -0.3 > -1.0: acc_norm right
        {"ll": [-1.0, -5.0], "chars": [1, 100], "label": 1},  # acc wrong; -0.05 > -1.0: acc_norm right
        {"ll": [-4.0, -1.0], "chars": [1, 1], "label": 1},
    ]
    metrics = choice_metrics(rows)
    assert metrics["acc"].value == 0.5 and metrics["acc_norm"].value == 1.0
    assert metrics["acc"].se == pytest.approx(math.sqrt(1 / 3) / 2)  # sample std of [1, 0, 0, 1] / sqrt(4)
    assert metrics["acc_norm"].se == 0.0 and metrics["acc"].n == 4


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" and "the cat on the mat" = 5: P = 5/5, R = 5/6, F = 2PR / (P + R) = 10/11.
    assert rouge_scores("the cat sat on the mat", "the cat on the mat")["rougeL"] == pytest.approx(100 * 10 / 11)
    assert rouge_scores("the cat sat", "dogs bark")["rougeL"] == 0.0


def test_mean_and_se_and_first_line():
    assert mean_and_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1 / math.sqrt(3)))
    assert first_line("\n A summary.\nMore text") == "A summary."
    assert first_line("Short. ### Article: next") == "Short."


def test_summary_prompt_cuts_the_document_never_the_instruction(tokenizer):
    item = SummaryItem("word " * 2000, "ref", "Summarize the above article in 1 sentence.")
    ids = summary_prompt(tokenizer, item, 128)
    assert ids.shape[1] <= 130
    text = tokenizer.decode(ids[0])
    assert "\n\nSummarize the above article in 1 sentence." in text and text.count("word") > 50
    assert text.endswith("<|im_start|>assistant\n")  # SmolLM2's own chat template


def test_wikitext_task_equals_the_perplexity_function(dm, tokenizer):
    result = run_task(dm.engine, tokenizer, "wikitext2", settings=TaskSettings(limit=3, context=64), progress=False)
    windows = perplexity_windows(tokenizer, load_text("wikitext2"), 64, 3)
    reference = perplexity(dm.engine, windows, progress=False)
    assert result.metrics["ppl"].value == pytest.approx(reference.ppl, rel=1e-4)
    assert result.metrics["ppl"].se == pytest.approx(reference.ppl_se, rel=1e-3)
    assert result.examples == 3 and result.compute_ratio == pytest.approx(1.0)
    # both go through `window_nll`: the transformers model's own loss on the same windows is the reference
    with torch.no_grad():
        nll = [float(dm.model(w[None], labels=w[None]).loss) for w in windows]
    assert result.metrics["ppl"].value == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_a_cached_run_resumes_without_recomputing(dm, tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "arc.jsonl"
    first = run_task(dm.engine, tokenizer, "arc-easy", settings=TaskSettings(limit=4), cache=cache, progress=False)
    lines = cache.read_text().splitlines()  # a header, then one row per example
    cache.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])  # a crash in the middle of the last write
    signature = json.loads(lines[0])["signature"]
    assert len(ExampleCache(cache, signature).rows) == 3
    calls = []
    real = choice_logliks

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("dashskip.eval.tasks.choice_logliks", counting)
    second = run_task(dm.engine, tokenizer, "arc-easy", settings=TaskSettings(limit=4), cache=cache, progress=False)
    assert len(calls) == 1  # only the torn example ran again
    assert second.metrics["acc"].value == first.metrics["acc"].value
    assert second.metrics["acc_norm"].value == first.metrics["acc_norm"].value
    assert len(cache.read_text().splitlines()) == 5  # the torn line was cut off, not glued to the next row


def test_a_cache_of_another_run_is_refused(dm, tokenizer, tmp_path):
    from dashskip.errors import DashskipError

    cache = tmp_path / "arc.jsonl"
    run_task(
        dm.engine, tokenizer, "arc-easy", settings=TaskSettings(limit=1), cache=cache, progress=False, run={"m": 1}
    )
    with pytest.raises(DashskipError, match="another run"):
        run_task(
            dm.engine, tokenizer, "arc-easy", settings=TaskSettings(limit=1), cache=cache, progress=False, run={"m": 2}
        )


def test_summarization_runs_and_counts_generated_tokens(dm, tokenizer):
    result = run_task(
        dm.engine, tokenizer, "cnn-dailymail", settings=TaskSettings(limit=2, max_new_tokens=6), progress=False
    )
    assert result.examples == 2 and 2 <= result.new_tokens <= 12
    assert 0.0 <= result.metrics["rougeL"].value <= 100.0


def test_unknown_task_is_refused(dm, tokenizer):
    from dashskip.errors import DashskipError

    with pytest.raises(DashskipError, match="unknown task"):
        run_task(dm.engine, tokenizer, "squad", progress=False)


def test_adaskip_ratio_comes_from_its_sublayer_plan(dm, tokenizer):
    from dashskip.core.decisions import SublayerSkip
    from dashskip.methods.skipping import AdaSkip

    plan = AdaSkip({2: SublayerSkip(attn=1.0, mlp=None), 3: SublayerSkip(attn=None, mlp=1.0)}, plan_ratio=1.23)
    result = run_task(
        dm.engine, tokenizer, "wikitext2", plan, settings=TaskSettings(limit=1, context=32), progress=False
    )
    full = run_task(dm.engine, tokenizer, "wikitext2", settings=TaskSettings(limit=1, context=32), progress=False)
    assert result.compute_ratio == pytest.approx(1.23)  # every state reads full; the plan is what saves compute
    assert result.metrics["ppl"].value != full.metrics["ppl"].value  # and the plan really ran


def test_a_text_is_tokenized_once_per_tokenizer(tokenizer):
    """What a sweep's cells share: the same ids, computed once, equal to the tokenizer's own; windows are copies."""
    from dashskip.data import text_ids

    text = load_text("wikitext2")[:20000]
    first = text_ids(tokenizer, text)
    assert text_ids(tokenizer, text) is first
    assert torch.equal(first, tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0])
    windows = perplexity_windows(tokenizer, text, 64, 2)
    windows.zero_()
    assert not bool((text_ids(tokenizer, text)[:64] == 0).all())
