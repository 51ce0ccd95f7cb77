"""Evaluation and calibration text, from local files first, the `datasets` hub last.

Tests and CI read `../shared/data` (relative to the project root); users point
`--data` at a file or folder, set `DASHSKIP_DATA`, or, online, let the
`datasets` hub serve the same splits. Nothing here is ever bundled.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

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


def token_windows(tokenizer, text: str, num: int, length: int, seed: int = 0) -> torch.Tensor:
    """`num` random windows of `length` tokens from `text` (BOS first where the model expects it), (num, length)."""
    if num < 1 or length < 2:
        raise DashskipError(f"need at least 1 sample of at least 2 tokens, got {num} x {length}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    bos = leading_bos(tokenizer)
    content = length - (bos is not None)
    if ids.numel() < content:
        raise DashskipError(
            f"data set has {ids.numel()} tokens, fewer than one window of {length}; use a shorter --seq-len"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - content + 1) for _ in range(num)]
    return with_bos(torch.stack([ids[s : s + content] for s in starts]), bos)


CHOICE_SETS = {"arc-easy": "arc/ARC-Easy-Test.jsonl", "arc-challenge": "arc/ARC-Challenge-Test.jsonl"}


def load_choice_questions(name: str, data_dir: str | Path | None = None) -> list[tuple[str, list[str], int]]:
    """ARC multiple-choice items as (question prompt, answer continuations, index of the right one)."""
    import json

    if name not in CHOICE_SETS:
        raise DashskipError(f"unknown multiple-choice set '{name}'; use one of {', '.join(CHOICE_SETS)}")
    looked = []
    for root in data_roots(data_dir):
        path = root / CHOICE_SETS[name]
        looked.append(str(path))
        if path.is_file():
            items = []
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                labels = [c["label"] for c in row["question"]["choices"]]
                if row["answerKey"] not in labels:
                    continue
                prompt = f"Question: {row['question']['stem']}\nAnswer:"
                items.append(
                    (prompt, [" " + c["text"] for c in row["question"]["choices"]], labels.index(row["answerKey"]))
                )
            return items
    raise DashskipError(
        f"data set '{name}' not found; looked in: {', '.join(looked)}; pass --data-dir or set DASHSKIP_DATA"
    )
