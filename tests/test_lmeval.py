"""The `dashskip` model type for lm-evaluation-harness and its offline tasks.

The model is a tiny random Llama with SmolLM2's vocabulary, so the real tokenizer is used while each token costs
milliseconds. References are a second model with identical weights, run by transformers directly or through
lm-eval's own `hf` model (HFLM), so "correct" means what lm-eval computes for a Hugging Face model. Nothing here
may reach the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import huggingface_hub
import lm_eval.tasks
import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from dashskip.api import DashModel
from dashskip.data import hellaswag_query
from dashskip.errors import DashskipError
from dashskip.eval.lmeval import LOCAL_TASKS, DashskipLM, local_tasks
from tests.conftest import tiny_policy, tiny_smol

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The hub and datasets libraries read these flags once, at import; patch their copies and the environment."""
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def task_manager() -> TaskManager:
    return TaskManager(include_path=str(local_tasks()))


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def hf_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's recipe written out on transformers' logits: trailing context spaces move to the continuation,
    whose tokens are the whole text's after the context's; an empty context is the BOS token."""
    if context:
        stripped = context.rstrip()
        ctx = tokenizer(stripped)["input_ids"]
        cont = tokenizer(stripped + context[len(stripped) :] + continuation)["input_ids"][len(ctx) :]
    else:
        ctx, cont = [tokenizer.bos_token_id], tokenizer(continuation)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont[:-1]])).logits[0, -len(cont) :]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs[torch.arange(len(cont)), torch.tensor(cont)]
    return float(picked.sum()), bool((logprobs.argmax(-1) == torch.tensor(cont)).all())


PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("", "An empty context is scored after BOS."),
    ("The cat", " lawyer lawyer lawyer"),  # the tiny model's own greedy continuation
    ("The cat ", "sat on the mat."),  # trailing space: it belongs to the continuation
    ("Short", " and a much longer continuation of several more tokens than the context"),
]


def test_model_type_is_registered_where_the_cli_looks():
    assert get_model("dashskip") is DashskipLM
    assert get_model("hf") is HFLM  # registering ours must not hide lm-eval's stock types


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_is_the_hf_models_log_softmax(tokenizer, batch_size):
    reference = tiny_smol(tokenizer)
    lm = DashskipLM(DashModel(tiny_smol(tokenizer), tokenizer), batch_size=batch_size)
    ours = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    expected = [hf_loglikelihood(reference, tokenizer, *pair) for pair in PAIRS]
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in expected]
    assert expected[2][1]  # one continuation is greedy, so the flag is tested both ways
    for (got, _), (want, _) in zip(ours, expected, strict=True):
        assert abs(got - want) < 1e-4
    assert lm.compute_ratio == 1.0


def test_truncation_and_rolling_windows_match_lm_evals_hf_model(tokenizer):
    """max_length 16 forces left-truncated contexts and several rolling windows per text."""
    hf = HFLM(pretrained=tiny_smol(tokenizer), tokenizer=tokenizer, batch_size=2, max_length=16, device="cpu")
    lm = DashskipLM(DashModel(tiny_smol(tokenizer), tokenizer), batch_size=2, max_length=16)
    texts = [("The quick brown fox jumps over the lazy dog. " * 4,), ("Hello world",), ("",)]
    rolling = requests("loglikelihood_rolling", texts)
    for got, want in zip(lm.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling), strict=True):
        assert abs(got - want) < 1e-3
    pairs = requests(
        "loglikelihood", [("A long context with many words, more than sixteen tokens in all", " end"), *PAIRS]
    )
    for (got, got_greedy), (want, want_greedy) in zip(lm.loglikelihood(pairs), hf.loglikelihood(pairs), strict=True):
        assert abs(got - want) < 1e-4 and got_greedy == want_greedy


def test_generate_until_stops_at_a_stop_string_and_equals_hf_greedy(tokenizer):
    prompts = ["Once upon a time", "The capital of France is a city"]
    reference = tiny_smol(tokenizer)
    ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    new = reference.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True)
    stop = tokenizer.decode(new[5:7])  # a string the greedy path produces halfway
    assert stop and text.index(stop) > 0
    reqs = requests("generate_until", [(p, {"until": [stop], "max_gen_toks": 12, "do_sample": False}) for p in prompts])
    lm = DashskipLM(DashModel(tiny_smol(tokenizer), tokenizer), batch_size=2)
    ours = lm.generate_until(reqs)
    assert ours[0] == text.split(stop)[0]
    assert lm.tokens < 2 * 12  # the first row stopped early instead of running to max_gen_toks
    hf = HFLM(pretrained=reference, tokenizer=tokenizer, batch_size=2, device="cpu")
    assert ours == hf.generate_until(reqs)


def test_a_policy_runs_per_token_and_batching_changes_no_score(by_rule, tokenizer):
    model = tiny_smol(tokenizer)
    dm = DashModel(model, tokenizer, policy=tiny_policy(model), speedup=2.0, wall_clock=False)
    one, four = DashskipLM(dm, batch_size=1), DashskipLM(dm, batch_size=4)
    scores_one = one.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    scores_four = four.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, _), (b, _) in zip(scores_one, scores_four, strict=True):
        assert abs(a - b) < 1e-4
    assert one.tokens == four.tokens > 0
    assert one.compute_ratio == pytest.approx(2.0, rel=0.03) and abs(one.compute_ratio - four.compute_ratio) < 1e-5
    assert one.get_model_info()["dashskip_compute_ratio"] == one.compute_ratio
    full = DashskipLM(dm, method="full")  # a method of the baseline registry, on the same model
    full.loglikelihood(requests("loglikelihood", PAIRS[:2]), disable_tqdm=True)
    assert full.compute_ratio == 1.0 and full.get_model_info()["dashskip_method"] == "full"


def test_bad_arguments_name_the_fix(tokenizer):
    dm = DashModel(tiny_smol(tokenizer), tokenizer)
    with pytest.raises(DashskipError, match="batch_size"):
        DashskipLM(dm, batch_size="auto")
    with pytest.raises(DashskipError, match="policy"):
        DashskipLM(dm, speedup=2.0)
    with pytest.raises(DashskipError, match="unknown method"):
        DashskipLM(dm, method="nope")
    with pytest.raises(DashskipError, match="top_k"):
        DashskipLM(dm).generate_until(requests("generate_until", [("Hi", {"until": ["\n"], "top_k": 5})]))


def test_local_tasks_have_the_stock_prompts_and_metrics(task_manager):
    stock = Path(lm_eval.tasks.__file__).parent
    originals = {
        "dashskip_arc_easy": "arc/arc_easy.yaml",
        "dashskip_arc_challenge": "arc/arc_challenge.yaml",
        "dashskip_hellaswag": "hellaswag/hellaswag.yaml",
        "dashskip_sst2": "glue/sst2/default.yaml",
        "dashskip_rte": "glue/rte/default.yaml",
    }
    assert set(originals) == set(LOCAL_TASKS)
    folder = local_tasks()
    keys = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "target_delimiter")
    for name, original in originals.items():
        ours, theirs = load_yaml(folder / f"{name}.yaml", resolve_func=False), load_yaml(stock / original)
        assert {k: ours.get(k) for k in keys} == {k: theirs.get(k) for k in keys}, name


def test_local_tasks_load_offline_from_the_shared_data(task_manager):
    tasks = task_manager.load(list(LOCAL_TASKS))["tasks"]
    sizes = {}
    for name, task in tasks.items():
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        sizes[name] = len(docs)
    assert sizes == {
        "dashskip_arc_easy": 2376,
        "dashskip_arc_challenge": 1172,
        "dashskip_hellaswag": 10042,
        "dashskip_sst2": 872,
        "dashskip_rte": 277,
    }
    arc = tasks["dashskip_arc_easy"]
    doc = arc.test_docs()[0]
    assert arc.doc_to_text(doc).startswith("Question: Which statement best explains why photosynthesis")
    assert arc.doc_to_text(doc).endswith("?\nAnswer:") and arc.doc_to_target(doc) == 0
    rte = tasks["dashskip_rte"]
    assert rte.doc_to_text(rte.validation_docs()[0]).endswith(
        "Christopher Reeve had an accident. True or False?\nAnswer:"
    )
    sst2 = tasks["dashskip_sst2"]
    assert sst2.doc_to_text(sst2.validation_docs()[0]) == (
        "it 's a charming and often affecting journey . \nQuestion: Is this sentence positive or negative?\nAnswer:"
    )


# The first items of HellaSwag's validation file (rowanz/hellaswag, data/hellaswag_val.jsonl), fields as released.
RAW_HELLASWAG = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he"),
    ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady"),
    ("Sharpening knives", "A man is holding a pocket knife while sitting on some rocks in the wilderness.", "then he"),
]


def test_hellaswag_queries_are_lm_evals(task_manager):
    """lm-eval's `process_docs` on released items equals our reconstruction from the preprocessed file."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    for label, ctx_a, ctx_b in RAW_HELLASWAG:
        line = preprocess(f"{label}: {ctx_a} {ctx_b}")  # what the shared file holds: `ctx`, not capitalized
        assert hellaswag_query(line) == preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize())
    wikihow = "Personal Care and Style: How to curl your hair. Use a curling iron. set it to low heat first."
    assert hellaswag_query(wikihow) == wikihow  # wikiHow items have no ctx_b: the line is the query
    task = task_manager.load(["dashskip_hellaswag"])["tasks"]["dashskip_hellaswag"]
    doc = task.validation_docs()[0]
    assert task.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert task.doc_to_target(doc) == 3 and task.doc_to_choice(doc)[3] == "starts pulling up roofing on a roof."


def test_simple_evaluate_runs_a_local_task(tokenizer, task_manager):
    lm = DashskipLM(DashModel(tiny_smol(tokenizer), tokenizer), batch_size=4)
    out = simple_evaluate(model=lm, tasks=["dashskip_arc_easy"], limit=5, task_manager=task_manager)
    assert 0.0 <= out["results"]["dashskip_arc_easy"]["acc,none"] <= 1.0
    assert out["config"]["dashskip_compute_ratio"] == 1.0 and out["config"]["dashskip_tokens"] > 0


def test_command_line_runs_a_local_task(tmp_path, tokenizer):
    """`python -m dashskip.eval.lmeval` is the command users type: lm-eval's CLI, local tasks included by default."""
    folder = tmp_path / "model"
    tiny_smol(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    command = [
        sys.executable, "-m", "dashskip.eval.lmeval", "--model", "dashskip", "--model_args", f"pretrained={folder}",
        "--tasks", "dashskip_rte", "--limit", "2", "--device", "cpu", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dashskip_rte" in done.stdout and "compute ratio 1.000" in done.stderr
    (results,) = (tmp_path / "out").rglob("results_*.json")
    config = json.loads(results.read_text())["config"]
    assert config["dashskip_compute_ratio"] == 1.0 and config["dashskip_method"] == "dash"


@pytest.mark.real
def test_lm_eval_and_run_task_agree_on_arc_easy(tmp_path, task_manager, smollm2):
    """The same 20 ARC-Easy items, SmolLM2 in full, through lm-eval's local task and through our own `run_task`:
    the prompts are built independently (stock templates vs tasks.py), so equal scores mean equal prompts."""
    from dashskip.eval.tasks import TaskSettings, run_task

    dm = smollm2  # at its default point, 1.0: every layer in full
    lm = DashskipLM(dm, batch_size=4)
    out = simple_evaluate(model=lm, tasks=["dashskip_arc_easy"], limit=20, task_manager=task_manager, log_samples=True)
    cache = tmp_path / "arc.jsonl"
    ours = run_task(dm.engine, dm.tokenizer, "arc-easy", costs=dm.costs, settings=TaskSettings(limit=20), cache=cache)
    theirs = out["results"]["dashskip_arc_easy"]
    assert theirs["acc,none"] == ours.metrics["acc"].value
    assert theirs["acc_norm,none"] == ours.metrics["acc_norm"].value
    samples = sorted(out["samples"]["dashskip_arc_easy"], key=lambda s: s["doc_id"])
    rows = [json.loads(line) for line in cache.read_text().splitlines()[1:]]  # after the signature header
    assert len(samples) == len(rows) == 20
    for sample, row in zip(samples, sorted(rows, key=lambda r: r["index"]), strict=True):
        lm_eval_ll = [float(resp[0][0]) for resp in sample["resps"]]
        assert max(abs(a - b) for a, b in zip(lm_eval_ll, row["ll"], strict=True)) < 1e-3
    assert lm.compute_ratio == 1.0 and ours.compute_ratio == 1.0
