"""Evaluation tasks on the engine: perplexity, multiple choice by log-likelihood, summarization by ROUGE-L.

Prompts and metrics follow lm-evaluation-harness (acc; acc_norm = log-likelihood per character of the answer),
so our scores and lm-eval's agree on the full model. Each example's result is appended to a JSON-lines cache
the moment it exists: an interrupted run resumes where it stopped (the CPU is slow), and `limit` scores the
first N examples (MMLU's subjects are interleaved, so its first N are a stratified subset).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dashskip.core.costs import CostTable
from dashskip.core.decisions import Decider
from dashskip.core.handlers import activations
from dashskip.data import (
    CHOICE_TASKS,
    SUMMARY_TASKS,
    ChoiceItem,
    SummaryItem,
    leading_bos,
    load_choice_questions,
    load_summaries,
    load_text,
)
from dashskip.errors import DashskipError
from dashskip.eval.evaluation import executed_cost, perplexity_windows, window_nll
from dashskip.measure.calibration import scales_key
from dashskip.methods.dash.control import WINDOW_PASSES, WINDOW_RULE
from dashskip.models.chat import chat_input_ids
from dashskip.runtime.engine import Engine
from dashskip.runtime.generation import generate

TASKS = ("wikitext2", *CHOICE_TASKS, *SUMMARY_TASKS)
PRIMARY = {"wikitext2": "ppl", "mmlu": "acc", "sst2": "acc", "rte": "acc", "xsum": "rougeL", "cnn-dailymail": "rougeL"}


@dataclass
class Metric:
    value: float
    se: float  # standard error over examples (sample std / sqrt(n)); for ppl by the delta method
    n: int


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, Metric]
    # Layers / mean executed cost per token (decode cost table): over every scored token, or for summarization
    # over the generated tokens' paths (the prompt's prefill is not in it).
    compute_ratio: float
    examples: int
    seconds: float  # wall time of the examples, summed (prefill + decode + scoring; cached ones: their original)
    new_tokens: int = 0  # generated tokens (summarization)
    head_checks_per_token: float = 0.0  # early exit: extra LM-head evaluations per token, not in compute_ratio
    settings: dict = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)  # per example: NLL (perplexity) or the primary metric

    @property
    def primary(self) -> str:
        return PRIMARY.get(self.task, "acc_norm")

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "primary": self.primary}


class ExampleCache:
    """Per-example results as JSON lines, after a header that says what produced them.

    A torn last line (a crash mid-write) is cut off and its example recomputed; a file written by another run
    (other method, operating point, settings, cost table or skip scales) is refused rather than mixed in.
    """

    def __init__(self, path: Path | None, signature: dict) -> None:
        self.path, self.signature = path, json.loads(json.dumps(signature))
        self.rows: dict[int, dict] = {}
        if path is None or not path.exists():
            return
        text = path.read_text(encoding="utf-8")
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            path.write_text(text, encoding="utf-8")
        lines = text.splitlines()
        if lines and json.loads(lines[0]).get("signature") != self.signature:
            raise DashskipError(
                f"'{path}' holds results of another run (method, operating point, settings or model differ); "
                "use another cache file, or delete it to start over"
            )
        for line in lines[1:]:
            row = json.loads(line)
            self.rows[row["index"]] = row

    def add(self, index: int, row: dict) -> None:
        row = {"index": index, **row}
        self.rows[index] = row
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            if fh.tell() == 0:
                fh.write(json.dumps({"signature": self.signature}) + "\n")
            fh.write(json.dumps(row) + "\n")


def mean_and_se(values: list[float]) -> tuple[float, float]:
    x = torch.tensor(values, dtype=torch.float64)
    se = float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same examples and its SE: much tighter than the two SEs apart, since the examples'
    own difficulty cancels."""
    return mean_and_se([x - y for x, y in zip(a, b, strict=True)])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation, and the continuation's tokens
    are those of the whole string after the context's (BOS first where the model expects it)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = leading_bos(tokenizer)
    prefix = [] if bos is None else [bos]
    whole = prefix + tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = prefix + tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


def choice_logliks(
    engine: Engine, tokenizer, item: ChoiceItem, decider: Decider | None, costs: CostTable, max_length: int
) -> tuple[list[float], float, int]:
    """Summed log-probability of each continuation given the context, and the executed cost and tokens.

    Single-token answers (MMLU's letters, SST-2, RTE) share one pass over the context; otherwise the choices run
    as one right-padded batch (padding after a row's last token changes none of its logits).
    """
    pairs = [encode_pair(tokenizer, item.context, c) for c in item.choices]
    if any(len(cont) == 0 for _, cont in pairs):
        raise DashskipError(f"an answer of '{item.context[:40]}...' is empty after tokenization")
    seqs = [(ctx + cont)[-(max_length + 1) :] for ctx, cont in pairs]
    shared = all(len(cont) == 1 for _, cont in pairs) and len({tuple(s[:-1]) for s in seqs}) == 1
    rows = [seqs[0][:-1]] if shared else [s[:-1] for s in seqs]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = True
    result = engine.score(ids, decider, None if bool(mask.all()) else mask.long())
    # The head only where an answer token is predicted (Gemma's 262k-word head dominates otherwise).
    spans = [(0 if shared else j, int(mask[0 if shared else j].sum()), cont) for j, (_, cont) in enumerate(pairs)]
    where = sorted({(r, p) for r, end, cont in spans for p in range(end - len(cont), end)})
    picked = result.hidden[[r for r, _ in where], [p for _, p in where]]
    logprobs = torch.log_softmax(engine.backbone.logits(picked).float(), dim=-1)
    row_of = {key: k for k, key in enumerate(where)}
    scores = [
        float(sum(logprobs[row_of[(r, p)], t] for p, t in zip(range(end - len(cont), end), cont, strict=True)))
        for r, end, cont in spans
    ]
    cost, tokens = executed_cost(costs, result.states, decider, mask)
    return scores, cost, tokens


def _choice_correct(rows: list[dict], normalised: bool) -> list[float]:
    """1.0 where the best-scoring answer (by log-likelihood, or per character of the answer) is the right one."""
    out = []
    for r in rows:
        score = [ll / (n if normalised else 1) for ll, n in zip(r["ll"], r["chars"], strict=True)]
        out.append(float(max(range(len(score)), key=score.__getitem__) == r["label"]))
    return out


def _choice_metrics(rows: list[dict]) -> dict[str, Metric]:
    return {
        name: Metric(*mean_and_se(v), len(v))
        for name, v in (("acc", _choice_correct(rows, False)), ("acc_norm", _choice_correct(rows, True)))
    }


def summary_prompt(tokenizer, item: SummaryItem, max_prompt_tokens: int) -> torch.Tensor:
    """The document and the instruction in the model's chat template where it has one (an instruct model only
    follows instructions in its own format), else HELM's plain prompt. A document too long for the budget loses
    its end, never the instruction."""

    def render(document: str) -> list[int]:
        if getattr(tokenizer, "chat_template", None):
            return chat_input_ids(tokenizer, [{"role": "user", "content": f"{document}\n\n{item.instruction}"}])
        bos = leading_bos(tokenizer)
        text = f"###\nArticle: {document}\n\n{item.instruction}\n"
        return ([] if bos is None else [bos]) + tokenizer(text, add_special_tokens=False)["input_ids"]

    fixed = len(render(""))
    doc = tokenizer(item.document, add_special_tokens=False)["input_ids"]
    if len(doc) + fixed > max_prompt_tokens:
        doc = doc[: max(max_prompt_tokens - fixed, 16)]
    return torch.tensor([render(tokenizer.decode(doc))])


def first_line(text: str) -> str:
    """The summary is the first non-empty line of the generation, up to HELM's '###' stop."""
    return text.split("###")[0].strip().split("\n")[0].strip()


ROUGE = ("rougeL", "rouge1", "rouge2")


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE), use_stemmer=True)


def rouge_scores(reference: str, summary: str) -> dict[str, float]:
    """ROUGE F-measures x 100 (rouge-score, Porter stemming), as summarization papers report them."""
    scores = _rouge_scorer().score(reference, summary)
    return {k: 100 * scores[k].fmeasure for k in ROUGE}


def _summary_metrics(rows: list[dict]) -> dict[str, Metric]:
    return {k: Metric(*mean_and_se([r[k] for r in rows]), len(rows)) for k in ROUGE}


def _ppl_metrics(rows: list[dict]) -> dict[str, Metric]:
    mean, se = mean_and_se([r["nll"] for r in rows])
    return {"ppl": Metric(math.exp(mean), math.exp(mean) * se, len(rows)), "nll": Metric(mean, se, len(rows))}


@dataclass
class TaskSettings:
    limit: int | None = None
    context: int = 256  # perplexity: window length, stride = context (no overlap)
    max_length: int | None = None  # multiple choice: longest scored sequence (left-truncated beyond); None: the model's
    max_prompt_tokens: int = 768  # summarization
    max_new_tokens: int = 48


def _examples(engine: Engine, tokenizer, task: str, data_dir, settings: TaskSettings) -> list:
    if task == "wikitext2":
        return list(perplexity_windows(tokenizer, load_text("wikitext2", data_dir), settings.context, settings.limit))
    if task in CHOICE_TASKS:
        return load_choice_questions(task, data_dir)[: settings.limit]
    if task in SUMMARY_TASKS:
        return load_summaries(task, data_dir)[: settings.limit]
    raise DashskipError(f"unknown task '{task}'; use one of {', '.join(TASKS)}")


def _scorer(engine: Engine, tokenizer, task: str, decider, costs: CostTable, settings: TaskSettings) -> Callable:
    """A function example -> cached row for the task."""
    bb = engine.backbone
    if task == "wikitext2":

        def window(ids: torch.Tensor) -> dict:
            (nll,), cost, tokens = window_nll(engine, ids[None], decider, costs)
            return {"nll": nll, "cost": cost, "tokens": tokens}

        return window
    if task in CHOICE_TASKS:
        max_length = settings.max_length or bb.config.max_position_embeddings

        def question(item: ChoiceItem) -> dict:
            ll, cost, tokens = choice_logliks(engine, tokenizer, item, decider, costs, max_length)
            chars = [max(len(c) - c.startswith(" "), 1) for c in item.choices]  # lm-eval: the answer's own length
            return {"ll": ll, "chars": chars, "label": item.label, "cost": cost, "tokens": tokens}

        return question
    eos = tokenizer.eos_token_id

    def summary(item: SummaryItem) -> dict:
        ids = summary_prompt(tokenizer, item, settings.max_prompt_tokens)
        out = generate(
            engine, ids, decider=decider, max_new_tokens=settings.max_new_tokens, eos_token_id=eos, costs=costs
        )
        text = first_line(tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True))
        cost, tokens = executed_cost(costs, out.states, decider)
        return {
            **rouge_scores(item.reference, text),
            "summary": text,
            "new_tokens": tokens,
            "cost": cost,
            "tokens": tokens,
        }

    return summary


def _skip_scales(engine: Engine, decider: Decider | None) -> torch.Tensor:
    scales = decider.traits.skip_scales if decider is not None else None
    return engine.scales if scales is None else scales


def task_signature(
    engine: Engine, task: str, decider: Decider | None, costs: CostTable, settings: TaskSettings, run: dict | None
) -> dict:
    """What a cached example's result depends on besides the example: all but the limit."""
    return {
        **(run or {}),
        "task": task,
        "settings": {k: v for k, v in asdict(settings).items() if k != "limit"},
        "costs": costs.decode,
        "kv_rule": str(engine.kv_rule),
        "activations": activations(),  # the INT8/INT4 states' arithmetic
        "scales": scales_key(_skip_scales(engine, decider)),
        # DASH with rate control scores otherwise than at its calibrated bias; results of one are not the other's
        **({"rate_control": f"{WINDOW_RULE}, at most {WINDOW_PASSES} passes"}
           if getattr(decider, "control", None) is not None else {}),
    }


def run_task(
    engine: Engine,
    tokenizer,
    task: str,
    decider: Decider | None = None,
    costs: CostTable | None = None,
    settings: TaskSettings | None = None,
    data_dir: str | Path | None = None,
    cache: Path | None = None,
    progress: bool = True,
    run: dict | None = None,
) -> TaskResult:
    """Score `task` with the engine and decider; `cache` (a .jsonl path) makes the run resumable.

    `run` describes the decider (method, operating point, policy, ...) for the cache's signature; the task,
    its settings (all but the limit), the cost table, the K/V rule and the skip scales are added here.
    """
    settings = settings or TaskSettings()
    costs = costs or CostTable.default()
    examples = _examples(engine, tokenizer, task, data_dir, settings)
    if not examples:
        raise DashskipError(f"task '{task}' has no examples (limit {settings.limit})")
    store = ExampleCache(cache, task_signature(engine, task, decider, costs, settings, run))
    score = _scorer(engine, tokenizer, task, decider, costs, settings)
    todo = [i for i in range(len(examples)) if i not in store.rows]
    for i in tqdm(todo, desc=task, disable=not progress or not todo):
        checks, start = getattr(decider, "checks", 0), time.perf_counter()
        with torch.no_grad():
            row = score(examples[i])
        seconds = time.perf_counter() - start
        if hasattr(decider, "checks"):  # early exit: LM-head evaluations the layer-count ratio leaves out
            row["head_checks"] = decider.checks - checks
        store.add(i, {**row, "seconds": seconds})
    rows = [store.rows[i] for i in range(len(examples))]
    if task == "wikitext2":
        metrics, scores = _ppl_metrics(rows), [r["nll"] for r in rows]
    elif task in CHOICE_TASKS:
        metrics, scores = _choice_metrics(rows), _choice_correct(rows, normalised=PRIMARY.get(task) != "acc")
    else:
        metrics, scores = _summary_metrics(rows), [r["rougeL"] for r in rows]
    total_cost, total_tokens = sum(r["cost"] for r in rows), sum(r["tokens"] for r in rows)
    return TaskResult(
        task=task,
        metrics=metrics,
        compute_ratio=engine.backbone.num_layers * total_tokens / max(total_cost, 1e-9),
        head_checks_per_token=sum(r.get("head_checks", 0) for r in rows) / max(total_tokens, 1),
        examples=len(rows),
        seconds=sum(r["seconds"] for r in rows),
        new_tokens=sum(r.get("new_tokens", 0) for r in rows),
        settings=asdict(settings),
        scores=scores,
    )
