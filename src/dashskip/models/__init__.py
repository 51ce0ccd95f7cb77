"""Model families, the backbone the engine drives, and model loading.

The registry of families: one line per family file.
"""

from __future__ import annotations

from typing import Any

from dashskip.errors import DashskipError
from dashskip.models import gemma3, llama
from dashskip.models.family import Family

FAMILIES: dict[str, Family] = {t: f.FAMILY for f in (llama, gemma3) for t in f.FAMILY.model_types}


def family_for(config: Any) -> Family:
    model_type = getattr(config, "model_type", "?")
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise DashskipError(f"unsupported architecture '{model_type}'; dashskip supports: {supported}")
    return FAMILIES[model_type]
