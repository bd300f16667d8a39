"""What a model is, in one typed value: architecture, preset, overrides and the tasks it knows.

Every place that records or rebuilds a model (a stage job, a model card, the registry, a
checkpoint file) carries a :class:`ModelSpec`, so "which network is this" is written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allinone.models.base import RestorationModel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    preset: str = "tiny"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # The model's task ids, in order; None: the preset's own (a published preset may fix them,
    # e.g. PIP's five classes in its label order), else MiOIR's seven.
    task_names: tuple[str, ...] | None = None

    def build(self) -> RestorationModel:
        """The network with random init."""
        from allinone.models import build

        tasks = {} if self.task_names is None else {"task_names": tuple(self.task_names)}
        return build(self.name, self.preset, **tasks, **dict(self.overrides))

    def with_tasks(self, task_names: tuple[str, ...] | None) -> ModelSpec:
        return ModelSpec(self.name, self.preset, self.overrides, task_names)

    def load(self, weights: str | Path) -> RestorationModel:
        """The network with the weights of a local state-dict file (strict), in eval mode."""
        from allinone.models.weights import load_state_file

        model = self.build()
        load_state_file(model, weights, self.name)
        return model.eval()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "preset": self.preset,
            "overrides": dict(self.overrides),
            "task_names": None if self.task_names is None else list(self.task_names),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(
            name=str(data["name"]),
            preset=str(data.get("preset", "tiny")),
            overrides=dict(data.get("overrides") or {}),
            task_names=tuple(data["task_names"]) if data.get("task_names") else None,
        )
