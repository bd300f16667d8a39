"""PromptIR (Potlapalli et al., NeurIPS 2023) as its official code builds it (va1shn9v/PromptIR,
``net/model.py``): a Restormer U-Net whose decoder asks learned prompts at three points.

At each point a PromptGenBlock mixes 5 learned prompt components by weights the features choose
(softmax of a linear read of their global average), so the network is blind: it infers the
degradation and never sees a task id. The prompt is resized to the features, concatenated to them,
passed through one transformer block and reduced back by a 1x1 convolution.

Every attribute has its official name, so the released checkpoint's keys are ours once its
Lightning wrapper's ``net.`` prefix is stripped. :class:`RestormerUNet` is the U-Net both PromptIR
and AdaIR (whose code is a fork of PromptIR's) build on; they differ only in :meth:`guide`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allinone.models.base import (
    DEFAULT_TASKS,
    OfficialRelease,
    Restoration,
    RestorationModel,
    register_model,
)
from allinone.models.restormer import (
    RESTORMER_PAPER,
    RESTORMER_TINY,
    Downsample,
    OverlapPatchEmbed,
    TransformerBlock,
    Upsample,
    transformer_stage,
)

# The decoder points a model may guide, named by PromptIR's prompt numbers: 3 is the latent,
# 2 the output of decoder level 3, 1 the output of decoder level 2.
GUIDED_POINTS = (3, 2, 1)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class RestormerUNet(RestorationModel):
    """Restormer's 4-level U-Net under the official attribute names, with a hook at three points.

    ``latent_channels`` is the width of what leaves the latent stage (after :meth:`guide` there);
    PromptIR's official code reduces it to half of Restormer's.
    """

    size_multiple = 8  # three 2x pixel-unshuffles

    def __init__(
        self,
        dim: int,
        num_blocks: Sequence[int],
        num_refinement_blocks: int,
        heads: Sequence[int],
        ffn_expansion_factor: float,
        latent_channels: int,
        task_names: Sequence[str],
    ) -> None:
        super().__init__(tuple(task_names))

        def stage(channels: int, level_heads: int, blocks: int) -> nn.Sequential:
            return transformer_stage(
                channels, level_heads, blocks, ffn_expansion_factor, False, "WithBias"
            )

        self.patch_embed = OverlapPatchEmbed(3, dim)
        self.encoder_level1 = stage(dim, heads[0], num_blocks[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = stage(dim * 2, heads[1], num_blocks[1])
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = stage(dim * 4, heads[2], num_blocks[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = stage(dim * 8, heads[3], num_blocks[3])
        self.up4_3 = Upsample(latent_channels)
        self.reduce_chan_level3 = conv1x1(latent_channels // 2 + dim * 4, dim * 4)
        self.decoder_level3 = stage(dim * 4, heads[2], num_blocks[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = conv1x1(dim * 4, dim * 2)
        self.decoder_level2 = stage(dim * 2, heads[1], num_blocks[1])
        # No 1x1 reduction at level 1: the last decoder stages work at twice the stem's width.
        self.up2_1 = Upsample(dim * 2)
        self.decoder_level1 = stage(dim * 2, heads[0], num_blocks[0])
        self.refinement = stage(dim * 2, heads[0], num_refinement_blocks)
        self.output = nn.Conv2d(dim * 2, 3, 3, padding=1, bias=False)

    @abc.abstractmethod
    def guide(self, point: int, image: Tensor, features: Tensor) -> Tensor:
        """Rewrite the features at a point of :data:`GUIDED_POINTS`, given the (padded) input."""

    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        enc1 = self.encoder_level1(self.patch_embed(x))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.guide(3, x, self.latent(self.down3_4(enc3)))
        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1))
        dec3 = self.guide(2, x, self.decoder_level3(dec3))
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1))
        dec2 = self.guide(1, x, self.decoder_level2(dec2))
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], 1))
        return Restoration(self.output(self.refinement(dec1)) + x)


class PromptGenBlock(nn.Module):
    """Mix ``prompt_len`` learned components by weights read from the features, at their size."""

    def __init__(self, prompt_dim: int, prompt_len: int, prompt_size: int, lin_dim: int) -> None:
        super().__init__()
        # Uniform [0, 1) as in the official code: every component starts positive and comparable.
        self.prompt_param = nn.Parameter(
            torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size)
        )
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        weights = self.linear_layer(x.mean(dim=(-2, -1))).softmax(dim=1)  # (N, L)
        prompt = (weights[:, :, None, None, None] * self.prompt_param).sum(dim=1)
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv3x3(prompt)


_PAPER = {
    **RESTORMER_PAPER,
    "prompt_len": 5,
    "prompt_dims": [64, 128, 320],
    "prompt_sizes": [64, 32, 16],
}
_TINY = {
    **RESTORMER_TINY,
    "prompt_len": 5,
    "prompt_dims": [16, 32, 64],
    "prompt_sizes": [16, 8, 4],
}


@register_model(
    "promptir",
    presets={"tiny": _TINY, "paper": _PAPER},
    description="PromptIR (official): Restormer U-Net, blind prompts at 3 decoder points",
    official=OfficialRelease(
        repository="va1shn9v/PromptIR",
        parameters=35_592_263,
        weights=(
            "model.ckpt, a Lightning checkpoint ({'state_dict': {'net.<key>': ...}}), from the "
            "v1.0 release of va1shn9v/PromptIR "
            "(https://github.com/va1shn9v/PromptIR/releases/download/v1.0/model.ckpt; "
            "also on the Google Drive its README links)"
        ),
    ),
)
class PromptIR(RestormerUNet):
    """``prompt_dims``/``prompt_sizes`` list prompts 1, 2, 3 (3 reads the latent).

    ``prompt_levels`` drops prompts for ablations; the official network has all three (its
    ``decoder=False`` path does not run), and without prompt 3 level 3 is Restormer's.
    """

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
        _check_prompts(dim, heads, prompt_dims, prompt_sizes, prompt_levels)
        # The official network hands the latent on at half its width once prompt 3 is fused in
        # (704 -> 192, not Restormer's 384), so up4_3 and reduce_chan_level3 shrink with it.
        latent_channels = dim * 4 if 3 in prompt_levels else dim * 8
        super().__init__(
            dim,
            num_blocks,
            num_refinement_blocks,
            heads,
            ffn_expansion_factor,
            latent_channels,
            task_names,
        )
        self.prompt_levels = frozenset(prompt_levels)
        for level in sorted(self.prompt_levels):
            # Prompt i reads features of dim * 2**i channels and hands them back at most 4 * dim
            # wide (the narrow latent above).
            read = dim * 2**level
            prompt_dim = prompt_dims[level - 1]
            width = read + prompt_dim
            prompt = PromptGenBlock(prompt_dim, prompt_len, prompt_sizes[level - 1], read)
            setattr(self, f"prompt{level}", prompt)
            # Every interaction block has level 3's head count, as in the official code.
            block = TransformerBlock(width, heads[2], ffn_expansion_factor)
            setattr(self, f"noise_level{level}", block)
            setattr(self, f"reduce_noise_level{level}", conv1x1(width, min(read, dim * 4)))
        self._add_uncalled_convolutions(dim, prompt_dims)

    def _add_uncalled_convolutions(self, dim: int, prompt_dims: Sequence[int]) -> None:
        """Six 1x1 convolutions the official network builds and its forward never calls (215,296
        parameters at the paper's sizes). They are kept so that the parameter count and the
        released checkpoint's keys are the official ones, and frozen: no gradient ever reaches
        them, so official training never changed them either, and a data-parallel wrapper need
        not look for unused parameters."""
        # The official hard-codes their widths as 64, 128, 256: prompt 1's width, doubling.
        widths = [prompt_dims[0] * 2**i for i in range(3)]
        uncalled = {
            "chnl_reduce1": conv1x1(prompt_dims[0], widths[0]),
            "chnl_reduce2": conv1x1(prompt_dims[1], widths[1]),
            "chnl_reduce3": conv1x1(prompt_dims[2], widths[2]),
            "reduce_noise_channel_1": conv1x1(dim + widths[0], dim),
            "reduce_noise_channel_2": conv1x1(dim * 2 + widths[1], dim * 2),
            "reduce_noise_channel_3": conv1x1(dim * 4 + widths[2], dim * 4),
        }
        for name, conv in uncalled.items():
            setattr(self, name, conv.requires_grad_(False))

    def prompt_parameters(self) -> Iterator[nn.Parameter]:
        """The prompt blocks: generation (promptN) and interaction (noise_levelN and its 1x1)."""
        prefixes = ("prompt", "noise_level", "reduce_noise_level")
        return (p for name, p in self.named_parameters() if name.startswith(prefixes))

    def guide(self, point: int, image: Tensor, features: Tensor) -> Tensor:
        if point not in self.prompt_levels:
            return features
        prompt = getattr(self, f"prompt{point}")(features)
        fused = getattr(self, f"noise_level{point}")(torch.cat([features, prompt], 1))
        return getattr(self, f"reduce_noise_level{point}")(fused)


def _check_prompts(
    dim: int,
    heads: Sequence[int],
    prompt_dims: Sequence[int],
    prompt_sizes: Sequence[int],
    prompt_levels: Sequence[int],
) -> None:
    if len(prompt_dims) != 3 or len(prompt_sizes) != 3:
        raise ValueError(
            f"prompt_dims and prompt_sizes need one value per prompt (3), "
            f"got {list(prompt_dims)} and {list(prompt_sizes)}"
        )
    if not set(prompt_levels) <= set(GUIDED_POINTS):
        raise ValueError(f"prompt_levels must be among 1, 2, 3, got {list(prompt_levels)}")
    for level in prompt_levels:
        read = dim * 2**level
        if (read + prompt_dims[level - 1]) % heads[2]:
            raise ValueError(
                f"prompt {level}: features ({read}) + prompt ({prompt_dims[level - 1]}) channels "
                f"must divide into heads[2] = {heads[2]} attention heads"
            )
