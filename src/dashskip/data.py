"""Evaluation and calibration text, from local files first, the `datasets` hub last.

Tests and CI read `../shared/data` (relative to the project root); users point
`--data` at a file or folder, set `DASHSKIP_DATA`, or, online, let the
`datasets` hub serve the same splits. Nothing here is ever bundled.
"""

from __future__ import annotations

import bz2
import csv
import itertools
import json
import os
import random
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch

from dashskip.errors import DashskipError

# name -> (file under the data folder, (hub dataset, config, split)). "wikitext2" is the standard test split
# (raw); "wikitext2-valid" is the validation split, which exists here only in tokenized form.
KNOWN_TEXT = {
    "wikitext2": ("wikitext2/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test")),
    "wikitext2-valid": ("wikitext2/wiki.valid.tokens", ("wikitext", "wikitext-2-raw-v1", "validation")),
}
# The tokenized files split numbers and hyphens as " @-@ "; undo that so the text reads like the raw split.
DETOKENIZE = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


def data_roots(explicit: str | Path | None = None) -> list[Path]:
    """Every folder that may hold the shared data, in the order they are tried."""
    roots = []
    if explicit:
        roots.append(Path(explicit).expanduser())
    if os.environ.get("DASHSKIP_DATA"):
        roots.append(Path(os.environ["DASHSKIP_DATA"]).expanduser())
    roots.append(Path.cwd() / ".." / "shared" / "data")
    roots.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return roots


def _wikitext_rows(path: Path) -> str:
    # The raw file has one row per line, blank rows written as " \n"; the usual setup joins rows with "\n\n".
    rows = ["" if line == " \n" else line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)]
    return "\n\n".join(rows)


def load_text(name: str, data_dir: str | Path | None = None) -> str:
    """The text of a named corpus ('wikitext2', 'wikitext2-valid') or of a plain text file."""
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if name not in KNOWN_TEXT:
        raise DashskipError(f"unknown data set '{name}': use one of {', '.join(KNOWN_TEXT)} or a path to a text file")
    relative, hub = KNOWN_TEXT[name]
    looked = []
    for root in data_roots(data_dir):
        candidate = root / relative
        looked.append(str(candidate))
        if candidate.is_file():
            text = _wikitext_rows(candidate)
            for old, new in DETOKENIZE:
                text = text.replace(old, new)
            return text
    try:
        import datasets

        rows = datasets.load_dataset(hub[0], hub[1], split=hub[2])["text"]
        return "\n\n".join(rows)
    except Exception as exc:  # ImportError, or any hub/network failure
        raise DashskipError(
            f"data set '{name}' not found; looked in: {', '.join(looked)} and the datasets hub ({type(exc).__name__}); "
            "pass --data PATH or set DASHSKIP_DATA to the folder that holds it"
        ) from None


def leading_bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer starts every text with it (Gemma): such models need it on every window."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos if bos is not None and len(ids) > 0 and ids[0] == bos else None


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Prepend a BOS column (windows then hold one content token less than their length)."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


# Texts tokenized lately, by tokenizer files and text: a sweep scores the same text in every cell, and WikiText-2's
# test set takes ~1 s to tokenize (20 of a sweep test's 34 s went to it), and so do the tests' windows.
_TOKENIZED: OrderedDict[tuple[str, str, int, int], torch.Tensor] = OrderedDict()
TOKENIZED_KEPT = 4


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """(tokens,) ids of `text` without special tokens, tokenized once per tokenizer and text (shared: copy before
    writing to it)."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else 0
    key = (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), size, hash(text))
    if key not in _TOKENIZED:
        _TOKENIZED[key] = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        while len(_TOKENIZED) > TOKENIZED_KEPT:
            _TOKENIZED.popitem(last=False)
    _TOKENIZED.move_to_end(key)
    return _TOKENIZED[key]


def token_windows(tokenizer, text: str, num: int, length: int, seed: int = 0) -> torch.Tensor:
    """`num` random windows of `length` tokens from `text` (BOS first where the model expects it), (num, length)."""
    if num < 1 or length < 2:
        raise DashskipError(f"need at least 1 sample of at least 2 tokens, got {num} x {length}")
    ids = text_ids(tokenizer, text)
    bos = leading_bos(tokenizer)
    content = length - (bos is not None)
    if ids.numel() < content:
        raise DashskipError(
            f"data set has {ids.numel()} tokens, fewer than one window of {length}; use a shorter --seq-len"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - content + 1) for _ in range(num)]
    return with_bos(torch.stack([ids[s : s + content] for s in starts]), bos)


class ChoiceItem(NamedTuple):
    """A multiple-choice question as lm-evaluation-harness scores it: context + each continuation."""

    context: str
    choices: list[str]  # continuations, each with its leading space
    label: int


class SummaryItem(NamedTuple):
    document: str
    reference: str
    instruction: str  # e.g. "Summarize the above article in 1 sentence."


def find_data_file(relative: str, data_dir: str | Path | None = None) -> Path:
    """The first data root holding `relative`, or an error that lists every place looked."""
    looked = []
    for root in data_roots(data_dir):
        path = root / relative
        looked.append(str(path))
        if path.exists():
            return path
    raise DashskipError(
        f"data file '{relative}' not found; looked in: {', '.join(looked)}; pass --data-dir PATH or set "
        "DASHSKIP_DATA to the folder that holds the shared data sets"
    )


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _arc(path: Path) -> list[ChoiceItem]:
    items = []
    for row in read_jsonl(path):
        labels = [c["label"] for c in row["question"]["choices"]]
        if row["answerKey"] not in labels:
            continue
        choices = [" " + c["text"] for c in row["question"]["choices"]]
        items.append(
            ChoiceItem(f"Question: {row['question']['stem']}\nAnswer:", choices, labels.index(row["answerKey"]))
        )
    return items


# HellaSwag's wikiHow items carry these activity labels; every other label is an ActivityNet activity.
WIKIHOW_CATEGORIES = frozenset(
    {
        "Cars & Other Vehicles", "Computers and Electronics", "Education and Communications", "Family Life",
        "Finance and Business", "Food and Entertaining", "Health", "Holidays and Traditions", "Home and Garden",
        "Home,Categories", "Personal Care and Style", "Pets and Animals", "Philosophy and Religion",
        "Relationships", "Sports and Fitness", "Travel", "Uncategorized", "Work World", "Youth",
    }
)  # fmt: skip


def hellaswag_query(line: str) -> str:
    """lm-eval's HellaSwag query from the shared file's context line.

    lm-eval builds `label: ctx_a + " " + ctx_b.capitalize()`; the file holds the dataset's `ctx` instead
    (ctx_a + " " + ctx_b, ctx_b lower-case) and lost the split. wikiHow items have an empty ctx_b, so their line
    is the query. In ActivityNet items ctx_a is whole sentences and ctx_b the start of the next one, i.e. what
    follows the last ". ": that tail is capitalized. 7 of the 3243 ActivityNet items have a tail that starts with
    a digit or a quote, where ctx_b may begin after it; those keep the tail as is (a possible 0.07 % mismatch).
    """
    label, _, context = line.partition(": ")
    if label in WIKIHOW_CATEGORIES:
        return line
    head, dot, tail = context.rpartition(". ")
    return f"{label}: {head}{dot}{tail.capitalize()}"


def hellaswag_records(path: str | Path) -> list[tuple[str, list[str], int]]:
    """(lm-eval's query, the four endings, the gold index) per item of the preprocessed file (six lines each:
    context, gold index, endings; preprocessed the way lm-eval does)."""
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    return [(hellaswag_query(lines[i]), lines[i + 2 : i + 6], int(lines[i + 1])) for i in range(0, len(lines) - 5, 6)]


def _hellaswag(path: Path) -> list[ChoiceItem]:
    return [ChoiceItem(query, [" " + e for e in endings], label) for query, endings, label in hellaswag_records(path)]


def read_tsv(path: str | Path) -> list[dict]:
    """Rows of a tab-separated file with a header; quotes are text (GLUE's files are not CSV-quoted)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def _sst2(path: Path) -> list[ChoiceItem]:
    # This copy's header says "text" where GLUE says "sentence"; the trailing space is kept, as lm-eval keeps it.
    rows = read_tsv(path)
    question = "\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return [ChoiceItem(r["text"] + question, [" negative", " positive"], int(r["label"])) for r in rows]


def _rte(path: Path) -> list[ChoiceItem]:
    return [
        ChoiceItem(
            f"{r['premise']}\nQuestion: {r['hypothesis']} True or False?\nAnswer:",
            [" True", " False"],
            0 if r["label"] == "entailment" else 1,
        )
        for r in read_jsonl(path)
    ]


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def _mmlu_block(row: list[str], answer: bool) -> str:
    question, *options, letter = row
    text = question.strip() + "".join(f"\n{k}. {o}" for k, o in zip("ABCD", options, strict=True)) + "\nAnswer:"
    return text + (f" {letter}\n\n" if answer else "")


def _mmlu(folder: Path, shots: int = 5) -> list[ChoiceItem]:
    """5-shot from each subject's dev split; subjects interleaved, so the first N items are a stratified subset."""
    per_subject = []
    for test in sorted((folder / "test").glob("*_test.csv")):
        subject = test.name.removesuffix("_test.csv")
        dev = _csv_rows(folder / "dev" / f"{subject}_dev.csv")[:shots]
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prefix = header + "".join(_mmlu_block(r, True) for r in dev)
        rows = _csv_rows(test)
        per_subject.append(
            [ChoiceItem(prefix + _mmlu_block(r, False), [" A", " B", " C", " D"], "ABCD".index(r[5])) for r in rows]
        )
    return [item for group in itertools.zip_longest(*per_subject) for item in group if item is not None]


# name -> (file or folder under the data root, reader)
CHOICE_TASKS = {
    "arc-easy": ("arc/ARC-Easy-Test.jsonl", _arc),
    "arc-challenge": ("arc/ARC-Challenge-Test.jsonl", _arc),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2", _hellaswag),
    "mmlu": ("mmlu", _mmlu),
    "sst2": ("glue/sst2_dev.tsv", _sst2),
    "rte": ("glue/rte_val.jsonl", _rte),
}


def load_choice_questions(name: str, data_dir: str | Path | None = None) -> list[ChoiceItem]:
    """A multiple-choice set in lm-evaluation-harness's prompt format (ARC, HellaSwag, MMLU 5-shot, SST-2, RTE)."""
    if name not in CHOICE_TASKS:
        raise DashskipError(f"unknown multiple-choice set '{name}'; use one of {', '.join(CHOICE_TASKS)}")
    relative, reader = CHOICE_TASKS[name]
    return reader(find_data_file(relative, data_dir))


XSUM_HEAD, XSUM_TAIL = "###\nArticle: ", "\n\nSummarize the above article in 1 sentence.\n"


def _xsum(path: Path) -> list[SummaryItem]:
    items = []
    for row in read_jsonl(path):
        document = row["article"].removeprefix(XSUM_HEAD).removesuffix(XSUM_TAIL)
        items.append(SummaryItem(document, row["summary_gt"], "Summarize the above article in 1 sentence."))
    return items


def _cnn(path: Path) -> list[SummaryItem]:
    instruction = "Summarize the above article in 3 sentences."
    return [
        SummaryItem(r["article"], r["highlights"].replace(" .\n", ". ").strip(), instruction) for r in read_jsonl(path)
    ]


SUMMARY_TASKS = {
    "xsum": ("xsum/xsum_0shot.jsonl", _xsum),
    "cnn-dailymail": ("cnn_dailymail/test_subset_from_stories.jsonl", _cnn),
}


def load_summaries(name: str, data_dir: str | Path | None = None) -> list[SummaryItem]:
    """XSum (the HELM-format copy of its first 1000 test documents) or the 10 CNN/DailyMail smoke-test stories."""
    if name not in SUMMARY_TASKS:
        raise DashskipError(f"unknown summarization set '{name}'; use one of {', '.join(SUMMARY_TASKS)}")
    relative, reader = SUMMARY_TASKS[name]
    return reader(find_data_file(relative, data_dir))
