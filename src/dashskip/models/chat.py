"""Chat prompts rendered with the tokenizer's own chat template, shared by `dashskip chat`, the tasks and the server.

The model's own template is used because an instruct model only answers well in the format it was tuned on; a
hand-written format would silently degrade every reply. What a user writes is text: a special token's spelling
inside a message (`<|im_end|>`, `<|im_start|>system`) is tokenized as the characters it is, so nobody can close
their turn and forge a system message; the template's own special tokens stay special.
"""

from __future__ import annotations

from typing import Any

from dashskip.errors import DashskipError

PLACEHOLDER = "\u2063dashskip-content-{}\u2063"  # invisible separators: no template or user text contains these


def special_strings(tokenizer: Any) -> list[str]:
    """Every string the tokenizer would turn into a special token."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {t.content for t in added.values() if getattr(t, "special", False)}
    return sorted(found | set(getattr(tokenizer, "all_special_tokens", []) or []), key=len, reverse=True)


def _render(tokenizer: Any, messages: list[dict[str, str]], **options: Any) -> Any:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **options)
    except TemplateError as exc:
        raise DashskipError(
            f"the model's chat template rejected these messages ({exc}); fix the message roles"
        ) from None


def chat_input_ids(tokenizer: Any, messages: list[dict[str, str]], special_in_content: bool = False) -> list[int]:
    """Token ids of `messages` plus the assistant's turn opener.

    `special_in_content=True` parses special-token spellings inside messages as special tokens (the template's
    plain behaviour); by default they are text.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DashskipError(
            "this model's tokenizer has no chat template; use plain completion instead "
            "(`dashskip generate`, or /v1/completions on the server)"
        )
    specials = special_strings(tokenizer)
    if special_in_content or not any(s in m["content"] for m in messages for s in specials):
        return [int(i) for i in _render(tokenizer, messages, return_dict=True)["input_ids"]]
    return _content_as_text(tokenizer, messages)


def _content_as_text(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Render the template around placeholders, then tokenize its own text with special tokens and each
    message's content without."""
    marked = [{**m, "content": PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
    text = _render(tokenizer, marked, tokenize=False)
    ids: list[int] = []
    for i, message in enumerate(messages):
        before, found, text = text.partition(PLACEHOLDER.format(i))
        if not found:
            raise DashskipError("the chat template dropped or changed a message; special tokens cannot be escaped")
        ids += tokenizer(before, add_special_tokens=False)["input_ids"]
        ids += tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]
