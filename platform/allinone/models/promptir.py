"""PromptIR (Potlapalli et al., NeurIPS 2023): a Restormer U-Net whose decoder asks learned prompts.

Each prompted decoder level holds L prompt components. The image's own features choose a mixture of
them (softmax over a linear read of the pooled features), so the network is blind: it infers the
degradation instead of being told. The mixed prompt is resized to the feature map and fused by
concatenation, one transformer block, and a 1x1 conv back to the feature's channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allinone.models.base import DEFAULT_TASKS, Restoration, RestorationModel, register_model
from allinone.models.blocks import (
    RESTORMER_PAPER,
    RESTORMER_TINY,
    TransformerBlock,
    UNet,
    conv1x1,
    conv3x3,
    restormer_blocks,
)


class PromptGenBlock(nn.Module):
    """Mix L learned prompt components by weights read from the features, at the features' size."""

    def __init__(self, feature_channels: int, prompt_dim: int, prompt_len: int, prompt_size: int):
        super().__init__()
        # Uniform [0, 1) init as in PromptIR: every component starts positive and comparable.
        self.components = nn.Parameter(
            torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size)
        )
        self.weigh = nn.Linear(feature_channels, prompt_len)
        self.refine = conv3x3(prompt_dim, prompt_dim)

    def forward(self, x: Tensor) -> Tensor:
        weights = self.weigh(x.mean(dim=(-2, -1))).softmax(dim=-1)  # (N, L)
        prompt = (weights[:, :, None, None, None] * self.components).sum(dim=1)
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(prompt)


class PromptBlock(nn.Module):
    """PromptGenBlock then PromptInteraction: concat, transformer block, 1x1 conv back."""

    def __init__(
        self,
        feature_channels: int,
        prompt_dim: int,
        prompt_len: int,
        prompt_size: int,
        heads: int,
        ffn_expansion_factor: float,
    ) -> None:
        super().__init__()
        self.generate = PromptGenBlock(feature_channels, prompt_dim, prompt_len, prompt_size)
        self.interact = TransformerBlock(feature_channels + prompt_dim, heads, ffn_expansion_factor)
        self.reduce = conv1x1(feature_channels + prompt_dim, feature_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.reduce(self.interact(torch.cat([x, self.generate(x)], dim=1)))


@register_model(
    "promptir",
    presets={
        "tiny": {
            **RESTORMER_TINY,
            "prompt_len": 5,
            "prompt_dims": [16, 32, 64],
            "prompt_sizes": [16, 8, 4],
        },
        "paper": {
            **RESTORMER_PAPER,
            "prompt_len": 5,
            "prompt_dims": [64, 128, 320],
            "prompt_sizes": [64, 32, 16],
        },
    },
    description="PromptIR: Restormer U-Net with blind prompt blocks at 3 decoder levels",
)
class PromptIR(RestorationModel):
    size_multiple = UNet.size_multiple

    def __init__(
        self,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        prompt_len: int = 5,
        prompt_dims: Sequence[int] = (64, 128, 320),
        prompt_sizes: Sequence[int] = (64, 32, 16),
        prompt_levels: Sequence[int] = (1, 2, 3),
        task_names: Sequence[str] = DEFAULT_TASKS,
    ) -> None:
        super().__init__(tuple(task_names))
        if len(prompt_dims) != 3 or len(prompt_sizes) != 3:
            raise ValueError(
                f"prompt_dims and prompt_sizes need one value per decoder level (3), "
                f"got {list(prompt_dims)} and {list(prompt_sizes)}"
            )
        if not set(prompt_levels) <= {1, 2, 3}:
            raise ValueError(
                f"prompt_levels must be among decoder levels 1, 2, 3, got {prompt_levels}"
            )
        self.unet = UNet(
            dim, num_blocks, num_refinement_blocks, restormer_blocks(heads, ffn_expansion_factor)
        )
        # PromptIR uses the level-3 head count for every prompt interaction block.
        self.prompts = nn.ModuleDict(
            {
                str(level): PromptBlock(
                    self.unet.decoder_channels(level),
                    prompt_dims[level - 1],
                    prompt_len,
                    prompt_sizes[level - 1],
                    heads[2],
                    ffn_expansion_factor,
                )
                for level in sorted(set(prompt_levels))
            }
        )

    def _prompt(self, level: int, h: Tensor) -> Tensor:
        return self.prompts[str(level)](h) if str(level) in self.prompts else h

    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        return Restoration(x + self.unet.decode(self.unet.encode(x), before_up=self._prompt))
