"""The platform's own FiLM U-Net: a prompt vector read from the degraded input scales and shifts
the output of every block of a generic U-Net (:class:`~allinone.models.blocks.Stage`).

A relative of MiOIR's adaptive prompt, not the published network (that is ``mioir_adaptive``):
here the prompt steers every block, encoder included, and the backbone is a choice of Restormer
blocks, NAFNet blocks or SRResNet-style residual conv blocks. The ``cpu`` preset (residual blocks
behind a pixel-unshuffle stem) learns the most per CPU minute of everything measured here
(benchmarks/quality.py): it is the quickstart's model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn

from allinone.models.base import DEFAULT_TASKS, Restoration, RestorationModel, register_model
from allinone.models.blocks import (
    BlockFactory,
    ResUNet,
    UNet,
    conv3x3,
    nafnet_blocks,
    resnet_blocks,
    restormer_blocks,
)
from allinone.models.restormer import RESTORMER_TINY

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


class FiLMUNet(RestorationModel):
    """A backbone U-Net steered block by block by a vector extracted from its input."""

    size_multiple = UNet.size_multiple

    def __init__(
        self,
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
        self.prompt = DegradationEncoder(prompt_dim)

    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        return Restoration(x + self.unet(x, self.prompt(x)))


_TINY = {**RESTORMER_TINY, "prompt_dim": 64}
PRESETS = {
    "tiny": {**_TINY, "backbone": "nafnet"},
    "tiny_restormer": {**_TINY, "backbone": "restormer"},
    # For CPUs: residual conv blocks in a U-Net of constant per-level width, every level at half
    # resolution (pixel-unshuffle stem): learns most per CPU minute (benchmarks/quality.py).
    "cpu": {"dim": 32, "num_blocks": [2, 2, 2], "prompt_dim": 64, "backbone": "resnet", "stem": 2},
}


@register_model("film_unet", PRESETS, "FiLM U-Net: a vector read from the input steers every block")
def film_unet(**kwargs: Any) -> FiLMUNet:
    return FiLMUNet(**kwargs)
