"""What every restoration model shares: any-size input, auxiliary outputs, a registry of builders.

A model is an ``nn.Module`` whose ``forward(x)`` takes an (N, 3, H, W) batch in [0, 1] of any H and
W and returns the restored batch of the same shape, so a plain ``mlflow.pytorch.load_model`` user
can call it directly. The trainer asks for more with ``forward(x, task_id, with_aux=True)``, which
returns a :class:`Restoration` carrying degradation logits and named regularisers; the trainer adds
``pixel_loss + sum(weight[name] * aux[name])`` without knowing which model it trains.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# MiOIR's seven tasks, in its training order; models default to these names and this many tasks.
DEFAULT_TASKS: tuple[str, ...] = ("sr", "deblur", "denoise", "jpeg", "derain", "dehaze", "lowlight")


class Restoration(NamedTuple):
    """A model's full answer for one batch.

    A named tuple, not a dataclass: DeepSpeed's ZeRO-3 finds the tensors of a module's answer in
    tuples, lists and dicts only, and without them it cannot gather the root module's own
    parameters (MPerceiver's textual prompts) again for the backward pass. Immutable: a model
    adds to an answer with ``_replace``."""

    # None only when a training target was given and the model computes its own objective instead
    # of an image (a diffusion model's noise prediction): the trainer then adds no pixel loss.
    image: Tensor | None
    # Degradation-class logits (N, num_tasks) from a blind predictor, when the model has one.
    logits: Tensor | None = None
    # Named scalar terms the trainer weighs and adds: regularisers that need no labels (PIP's
    # prompt orthogonality) and, when a target was given, the model's own supervised terms
    # (AM-PromptIR's frequency loss, MPerceiver's noise prediction). A default shared by every
    # answer, so read-only.
    aux: Mapping[str, Tensor] = MappingProxyType({})


class RestorationModel(nn.Module, abc.ABC):
    """Base class: pads to the network's size multiple, restores, crops back.

    Subclasses implement :meth:`restore` on a padded batch and set ``size_multiple``.
    """

    size_multiple: int = 1
    # True for a network that cannot restore without being told the task (AM-PromptIR reads the
    # degradation's text, as published): evaluation then tells it the test set's task.
    needs_task: bool = False
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

    def pretrained_sources(self) -> dict[str, str]:
        """Qualified-name prefix -> the local file its weights were loaded from, for parts that
        the model's own ``pretrained_*`` arguments supply (none by default)."""
        return {}

    def training_state_dict(self) -> dict[str, Tensor]:
        """What checkpoints and stage weights hold: every tensor but those pretrained files
        supply (a rebuild from the same model spec, which names the files, loads those again;
        Stable Diffusion's 2 B frozen parameters are not copied into every checkpoint)."""
        supplied = tuple(prefix + "." for prefix in self.pretrained_sources())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(supplied)}

    def load_training_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`training_state_dict`'s tensors (a full state dict loads too)."""
        from allinone.models.weights import state_dict_mismatch

        mismatch = state_dict_mismatch(self, state)
        if mismatch:
            raise ValueError(f"the weights do not fit {type(self).__name__}: {mismatch}")
        self.load_state_dict(state, strict=False)

    @abc.abstractmethod
    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        """Restore a batch already padded to ``size_multiple``."""

    def supervised_terms(self, restored: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Loss terms of this model's own beyond the pipeline's pixel loss (none by default)."""
        return {}

    def forward(
        self,
        x: Tensor,
        task_id: Tensor | None = None,
        with_aux: bool = False,
        target: Tensor | None = None,
    ) -> Tensor | Restoration:
        """Restore ``x``; in training (``target`` given, ``with_aux``) the answer also carries the
        model's supervised terms. Training goes through ``forward`` so that engines that hook
        modules (DeepSpeed ZeRO-3 gathers parameters on forward) see every call."""
        height, width = x.shape[-2:]
        out = self.restore(pad_to_multiple(x, self.size_multiple), task_id)
        out = out._replace(image=out.image[..., :height, :width])
        if target is not None:
            out = out._replace(aux={**out.aux, **self.supervised_terms(out.image, target)})
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
class OfficialRelease:
    """How a published architecture relates to its authors' code and released checkpoints.

    ``parameters`` is the official network's parameter count at ``preset`` (counted from the
    authors' code, random init), which that preset must equal. ``unused`` are regular expressions
    (full match) of official checkpoint keys that the official forward never uses and that our
    network therefore lacks: the importer drops them by name and nothing else. ``rename`` maps an
    official key (wrapper prefixes already stripped) to ours, where the names differ.
    """

    repository: str
    parameters: int
    preset: str = "paper"
    # Which released files import and where their authors publish them ("" where none are).
    weights: str = ""
    unused: tuple[str, ...] = ()
    rename: Callable[[str], str] | None = None
    # Our key for tensors the release keeps outside its checkpoint, read from a .npy file at
    # import (MiOIR's explicit prompt maps, data/type7.npy); None where there are none.
    prompts_key: str | None = None
    # Our key prefix for a component the authors release as a file of its own (MiOIR's
    # Classifier.pth beside Restormer_M_EP.pth); None where there is none.
    component_prefix: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: its builder and named presets of constructor arguments."""

    name: str
    builder: Callable[..., RestorationModel]
    presets: dict[str, dict[str, Any]]
    description: str
    # Set for a published network (its name is the paper's); None for the platform's own variants.
    official: OfficialRelease | None = None


class ModelRegistry(Mapping[str, ModelEntry]):
    """Every architecture by name, each module imported the first time one of its names is
    looked up: building PromptIR (in a Ray worker, in a CLI command) does not import Stable
    Diffusion's diffusers or open_clip. The names and their modules are declared up front, so
    listing the names imports nothing; iterating the entries imports them all."""

    def __init__(self) -> None:
        self._modules: dict[str, str] = {}  # name -> the module that registers it
        self._entries: dict[str, ModelEntry] = {}

    def declare(self, modules: dict[str, str]) -> None:
        self._modules.update(modules)

    def register(self, entry: ModelEntry) -> None:
        if entry.name not in self._modules:
            raise ValueError(f"model {entry.name!r} is registered but not declared in MODELS")
        self._entries[entry.name] = entry

    def __getitem__(self, name: str) -> ModelEntry:
        if name not in self._entries and name in self._modules:
            importlib.import_module(self._modules[name])
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


MODELS = ModelRegistry()


def register_model(
    name: str,
    presets: dict[str, dict[str, Any]],
    description: str,
    official: OfficialRelease | None = None,
) -> Callable[[Callable[..., RestorationModel]], Callable[..., RestorationModel]]:
    def decorate(builder: Callable[..., RestorationModel]) -> Callable[..., RestorationModel]:
        MODELS.register(ModelEntry(name, builder, presets, description, official))
        return builder

    return decorate


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def task_ids(names: list[str] | tuple[str, ...], task_names: tuple[str, ...]) -> torch.Tensor:
    """Map task names to the integer ids a model was built with."""
    return torch.tensor([task_names.index(n) for n in names], dtype=torch.long)
