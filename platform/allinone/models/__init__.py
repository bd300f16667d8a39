"""The model zoo: every architecture registers itself here and is built by name and preset.

model = allinone.models.build("promptir", preset="tiny", prompt_len=5)
"""

from __future__ import annotations

from typing import Any

# Importing an architecture's module registers it in MODELS (explicitly listed: no auto-discovery).
from allinone.models import clip_prompt, mioir, perceiver, pip, promptir  # noqa: E402,F401,I001  # noqa: E402,F401,I001
from allinone.models.base import (
    DEFAULT_TASKS,
    MODELS,
    ModelEntry,
    Restoration,
    RestorationModel,
    count_parameters,
    task_ids,
)

__all__ = [
    "DEFAULT_TASKS",
    "MODELS",
    "ModelEntry",
    "Restoration",
    "RestorationModel",
    "build",
    "count_parameters",
    "get_entry",
    "task_ids",
]


def get_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name]


def build(name: str, preset: str = "tiny", **overrides: Any) -> RestorationModel:
    """Build a randomly initialised model from a preset, overriding any constructor argument."""
    entry = get_entry(name)
    if preset not in entry.presets:
        raise ValueError(
            f"model {name!r} has no preset {preset!r} (presets: {', '.join(entry.presets)})"
        )
    return entry.builder(**{**entry.presets[preset], **overrides})
