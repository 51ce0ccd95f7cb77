"""Chat prompts rendered with the tokenizer's own chat template, shared by `dashskip chat` and the server."""

from __future__ import annotations

from typing import Any

from dashskip.errors import DashskipError


def chat_input_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` plus the assistant's turn opener.

    The model's own template is used because an instruct model only answers well in the format it was tuned on;
    a hand-written format would silently degrade every reply.
    """
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise DashskipError(
            "this model's tokenizer has no chat template; use plain completion instead "
            "(`dashskip generate`, or /v1/completions on the server)"
        )
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    except TemplateError as exc:
        raise DashskipError(
            f"the model's chat template rejected these messages ({exc}); fix the message roles"
        ) from None
    return [int(i) for i in encoded["input_ids"]]
