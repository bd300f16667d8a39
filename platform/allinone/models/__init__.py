"""The model zoo: every architecture registers itself here and is built by name and preset.

model = allinone.models.build("promptir", preset="tiny", prompt_len=5)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from allinone.models.base import (
    DEFAULT_TASKS,
    MODELS,
    ModelEntry,
    OfficialRelease,
    Restoration,
    RestorationModel,
    count_parameters,
    task_ids,
)

# Which module registers each architecture (explicitly listed: no auto-discovery); a module is
# imported when one of its names is first looked up.
MODELS.declare(
    {
        "promptir": "allinone.models.promptir",
        "adair": "allinone.models.adair",
        "am_promptir": "allinone.models.am_promptir",
        "clip_prompt": "allinone.models.clip_prompt",
        "film_unet": "allinone.models.film_unet",
        "mioir_explicit": "allinone.models.mioir",
        "mioir_adaptive": "allinone.models.mioir",
        "perceiver": "allinone.models.perceiver",
        "pip": "allinone.models.pip",
    }
)

__all__ = [
    "DEFAULT_TASKS",
    "MODELS",
    "ModelEntry",
    "OfficialRelease",
    "Restoration",
    "RestorationModel",
    "build",
    "count_parameters",
    "get_entry",
    "parameter_counts",
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


def parameter_counts(name: str, preset: str) -> tuple[int, int]:
    """(all, trainable) parameters of a preset, counted without allocating its weights: built
    for real, the paper presets (one of 1B parameters) take 30 s and 5 GB."""
    try:
        with torch.device("meta"), _StayOnMeta():
            model = build(name, preset)
    except (NotImplementedError, RuntimeError):  # a builder that needs real data at build time
        model = build(name, preset)
    return count_parameters(model), count_parameters(model, trainable_only=True)


class _StayOnMeta(TorchFunctionMode):
    """Keeps a meta tensor on meta when a builder moves it (open_clip moves CLIP to the CPU),
    which would otherwise need the data a meta tensor does not have."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))
