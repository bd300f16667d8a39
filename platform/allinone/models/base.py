"""What every restoration model shares: any-size input, auxiliary outputs, a registry of builders.

A model is an ``nn.Module`` whose ``forward(x)`` takes an (N, 3, H, W) batch in [0, 1] of any H and
W and returns the restored batch of the same shape, so a plain ``mlflow.pytorch.load_model`` user
can call it directly. The trainer asks for more with ``forward(x, task_id, with_aux=True)``, which
returns a :class:`Restoration` carrying degradation logits and named regularisers; the trainer adds
``pixel_loss + sum(weight[name] * aux[name])`` without knowing which model it trains.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# MiOIR's seven tasks, in its training order; models default to these names and this many tasks.
DEFAULT_TASKS: tuple[str, ...] = ("sr", "deblur", "denoise", "jpeg", "derain", "dehaze", "lowlight")


@dataclass
class Restoration:
    """A model's full answer for one batch."""

    image: Tensor
    # Degradation-class logits (N, num_tasks) from a blind predictor, when the model has one.
    logits: Tensor | None = None
    # Named scalar regularisers that need no labels (e.g. PIP's prompt orthogonality).
    aux: dict[str, Tensor] = field(default_factory=dict)


class RestorationModel(nn.Module, abc.ABC):
    """Base class: pads to the network's size multiple, restores, crops back.

    Subclasses implement :meth:`restore` on a padded batch and set ``size_multiple``.
    """

    size_multiple: int = 1
    # Weights of this model's auxiliary terms when a pipeline names none (train.aux_weights
    # overrides them); a term not listed here weighs 1.
    default_aux_weights: dict[str, float] = {}

    def __init__(self, task_names: tuple[str, ...] = DEFAULT_TASKS) -> None:
        super().__init__()
        self.task_names = tuple(task_names)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def prompt_parameters(self) -> Iterator[nn.Parameter]:
        """The prompt machinery's parameters, e.g. to tune prompts alone or give them their own LR.

        By default every parameter whose qualified name contains "prompt"; a model whose names
        do not say so overrides this.
        """
        return (p for name, p in self.named_parameters() if "prompt" in name)

    @abc.abstractmethod
    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        """Restore a batch already padded to ``size_multiple``."""

    def forward(
        self, x: Tensor, task_id: Tensor | None = None, with_aux: bool = False
    ) -> Tensor | Restoration:
        height, width = x.shape[-2:]
        out = self.restore(pad_to_multiple(x, self.size_multiple), task_id)
        out.image = out.image[..., :height, :width]
        return out if with_aux else out.image


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pad the bottom and right edges up to a multiple (replicate where reflect cannot)."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: its builder and named presets of constructor arguments."""

    name: str
    builder: Callable[..., RestorationModel]
    presets: dict[str, dict[str, Any]]
    description: str


MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str, presets: dict[str, dict[str, Any]], description: str
) -> Callable[[Callable[..., RestorationModel]], Callable[..., RestorationModel]]:
    def decorate(builder: Callable[..., RestorationModel]) -> Callable[..., RestorationModel]:
        MODELS[name] = ModelEntry(name, builder, presets, description)
        return builder

    return decorate


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def task_ids(names: list[str] | tuple[str, ...], task_names: tuple[str, ...]) -> torch.Tensor:
    """Map task names to the integer ids a model was built with."""
    return torch.tensor([task_names.index(n) for n in names], dtype=torch.long)
