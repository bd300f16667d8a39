"""MiOIR's prompts (Kong et al., "Towards Effective Multiple-in-One Image Restoration", 2024).

Both prompts are one vector per image that scales and shifts the output of every backbone block
(see :class:`~allinone.models.blocks.Stage`); they differ in where the vector comes from.

- Explicit prompt (EP): one learned vector per task. Training knows the task and picks its vector;
  a blind input (no task id) lets a small degradation classifier choose a softmax mixture of the
  task vectors, soft so the restoration loss reaches the classifier too. The classifier's logits
  are always returned, so the trainer's focal loss teaches it whenever the task is known.
- Adaptive prompt (AP): a small conv net reads the degraded input and emits the vector itself;
  no task id and no classifier.

The backbone is Restormer's U-Net with Restormer blocks, NAFNet blocks or SRResNet-style residual
conv blocks (``resnet``, with a pixel-unshuffle stem in the ``cpu`` preset: the one that learns most
per CPU minute, measured in benchmarks/quality.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allinone.models.base import DEFAULT_TASKS, Restoration, RestorationModel, register_model
from allinone.models.blocks import (
    RESTORMER_PAPER,
    RESTORMER_TINY,
    BlockFactory,
    ResUNet,
    UNet,
    conv3x3,
    nafnet_blocks,
    resnet_blocks,
    restormer_blocks,
)

Backbone = Literal["restormer", "nafnet", "resnet"]


class DegradationEncoder(nn.Module):
    """Summarise how an image is degraded as one vector.

    Degradations are global statistics (noise level, blur width, haze density), so strided convs
    gather local evidence and global average pooling throws position away on purpose.
    """

    def __init__(self, out_dim: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv3x3(3, width),
            nn.GELU(),
            conv3x3(width, 2 * width, stride=2),
            nn.GELU(),
            conv3x3(2 * width, 2 * width, stride=2),
            nn.GELU(),
        )
        self.head = nn.Linear(2 * width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))


class ExplicitPrompt(nn.Module):
    """A learned vector per task, chosen by task id or, blind, by a degradation classifier."""

    def __init__(self, num_tasks: int, prompt_dim: int) -> None:
        super().__init__()
        self.task_prompts = nn.Parameter(torch.randn(num_tasks, prompt_dim))
        self.classifier = DegradationEncoder(num_tasks)

    def forward(self, x: Tensor, task_id: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self.classifier(x)
        if task_id is None and self.training:
            weights = logits.softmax(dim=-1)  # soft, so a blind batch's loss reaches the classifier
        else:
            # The backbone learns under one task's prompt at a time: a blind inference picks the
            # classifier's task, not a mixture of prompts it never saw (measured: mixtures cost
            # 3-5 dB on rain and noise against the chosen prompt, benchmarks/quality.py).
            chosen = logits.argmax(dim=-1) if task_id is None else task_id
            weights = F.one_hot(chosen, len(self.task_prompts)).to(self.task_prompts.dtype)
        return weights @ self.task_prompts, logits


class AdaptivePrompt(nn.Module):
    """A vector read from the degraded input itself."""

    def __init__(self, prompt_dim: int) -> None:
        super().__init__()
        self.extractor = DegradationEncoder(prompt_dim)

    def forward(self, x: Tensor, task_id: Tensor | None) -> tuple[Tensor, None]:
        return self.extractor(x), None


def backbone_blocks(
    backbone: Backbone, heads: Sequence[int], ffn_expansion_factor: float
) -> BlockFactory:
    if backbone == "restormer":
        return restormer_blocks(heads, ffn_expansion_factor)
    if backbone == "nafnet":
        return nafnet_blocks(ffn_expansion_factor)
    if backbone == "resnet":
        return resnet_blocks()
    raise ValueError(f"unknown backbone {backbone!r} (known: restormer, nafnet, resnet)")


class MiOIR(RestorationModel):
    """A backbone U-Net steered block by block by an explicit or adaptive prompt vector."""

    size_multiple = UNet.size_multiple

    def __init__(
        self,
        prompt: Literal["explicit", "adaptive"],
        backbone: Backbone = "restormer",
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        prompt_dim: int = 64,
        stem: int = 1,
        task_names: Sequence[str] = DEFAULT_TASKS,
    ) -> None:
        super().__init__(tuple(task_names))
        blocks = backbone_blocks(backbone, heads, ffn_expansion_factor)
        if backbone == "resnet":  # its own CPU-friendly layout; no refinement stage
            self.unet = ResUNet(dim, num_blocks, blocks, prompt_dim=prompt_dim, stem=stem)
            self.size_multiple = self.unet.size_multiple
        else:
            self.unet = UNet(
                dim, num_blocks, num_refinement_blocks, blocks, prompt_dim=prompt_dim, stem=stem
            )
            self.size_multiple = UNet.multiple(stem)
        self.prompt: ExplicitPrompt | AdaptivePrompt = (
            ExplicitPrompt(self.num_tasks, prompt_dim)
            if prompt == "explicit"
            else AdaptivePrompt(prompt_dim)
        )

    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        prompt, logits = self.prompt(x, task_id)
        return Restoration(x + self.unet(x, prompt), logits)


_TINY = {**RESTORMER_TINY, "prompt_dim": 64}
PRESETS = {
    "tiny": {**_TINY, "backbone": "nafnet"},
    "tiny_restormer": {**_TINY, "backbone": "restormer"},
    "paper": {**RESTORMER_PAPER, "prompt_dim": 64, "backbone": "restormer"},
    # For CPUs: residual conv blocks in a U-Net of constant per-level width, every level at half
    # resolution (pixel-unshuffle stem): learns most per CPU minute (benchmarks/quality.py).
    "cpu": {"dim": 32, "num_blocks": [2, 2, 2], "prompt_dim": 64, "backbone": "resnet", "stem": 2},
    # NAFNet-width32-like: NAFNet's encoder depths; heads are unused by NAFNet blocks.
    "paper_nafnet": {
        **RESTORMER_PAPER,
        "dim": 32,
        "num_blocks": [2, 2, 4, 8],
        "num_refinement_blocks": 2,
        "ffn_expansion_factor": 2.0,
        "prompt_dim": 64,
        "backbone": "nafnet",
    },
}


@register_model("mioir_explicit", PRESETS, "MiOIR explicit prompt: per-task vector or classifier")
def mioir_explicit(**kwargs: Any) -> MiOIR:
    return MiOIR("explicit", **kwargs)


@register_model("mioir_adaptive", PRESETS, "MiOIR adaptive prompt: vector extracted from the input")
def mioir_adaptive(**kwargs: Any) -> MiOIR:
    return MiOIR("adaptive", **kwargs)
