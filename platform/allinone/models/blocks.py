"""Building blocks of the zoo: Restormer's and NAFNet's blocks and the U-Net the prompts plug into.

Restormer (Zamir et al., CVPR 2022) attends across channels instead of pixels (MDTA), so attention
costs grow linearly with the image area, and replaces the MLP by a gated depthwise-conv feed-forward
(GDFN). NAFNet (Chen et al., ECCV 2022) drops nonlinear activations altogether: a SimpleGate (split
the channels in two halves and multiply them) and a simplified channel attention do their job.

Both sit in one 4-level U-Net (:class:`UNet`, Restormer's layout). The prompt methods differ only
in where they touch it: PromptIR rewrites decoder features before each upsampling, PIP rewrites the
skip connections, MiOIR scales and shifts the output of every block from a prompt vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Builds one block for (channels, level); level 0 is full resolution, 3 the latent.
BlockFactory = Callable[[int, int], nn.Module]


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def depthwise3x3(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of an (N, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Channels last, because F.layer_norm's fused kernel normalises the last dimension.
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def channel_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, temperature: Tensor) -> Tensor:
    """Transposed attention: within each head, channels attend to channels; pixels are the features.

    q is (N, C, H, W); k and v are (N or 1, C, H, W) and broadcast over the batch; temperature is
    (heads, 1, 1). The attention map is (C/heads)^2 per head whatever the image size.
    """
    n, c, h, w = q.shape

    def by_head(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], heads, c // heads, h * w)

    # Unit-norm rows make the logits cosine similarities, bounded for any image size; the learned
    # temperature then sets how sharp each head's attention is.
    q, k = F.normalize(by_head(q), dim=-1), F.normalize(by_head(k), dim=-1)
    attn = (q @ k.transpose(-2, -1) * temperature).softmax(dim=-1)
    return (attn @ by_head(v)).reshape(n, c, h, w)


class ChannelAttention(nn.Module):
    """Restormer's multi-Dconv head transposed attention (MDTA)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention over {channels} channels cannot split into {heads} heads")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = conv1x1(channels, 3 * channels)
        # A depthwise conv gives q, k, v local context before the global, channel-wise mixing.
        self.qkv_local = depthwise3x3(3 * channels)
        self.project = conv1x1(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv_local(self.qkv(x)).chunk(3, dim=1)
        return self.project(channel_attention(q, k, v, self.heads, self.temperature))


class GatedFeedForward(nn.Module):
    """Restormer's gated-Dconv feed-forward network (GDFN): GELU(gate) * value, both local."""

    def __init__(self, channels: int, expansion: float) -> None:
        super().__init__()
        hidden = int(channels * expansion)
        self.expand = conv1x1(channels, 2 * hidden)
        self.local = depthwise3x3(2 * hidden)
        self.project = conv1x1(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.local(self.expand(x)).chunk(2, dim=1)
        return self.project(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: MDTA then GDFN."""

    def __init__(self, channels: int, heads: int, ffn_expansion_factor: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(channels)
        self.attention = ChannelAttention(channels, heads)
        self.norm2 = LayerNorm2d(channels)
        self.ffn = GatedFeedForward(channels, ffn_expansion_factor)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class SimpleGate(nn.Module):
    """NAFNet's activation: the product of the two channel halves (a GLU without the sigmoid)."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """NAFNet's block: gated depthwise-conv mixing with simplified channel attention, gated FFN."""

    def __init__(self, channels: int, ffn_expansion_factor: float = 2.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(channels)
        self.expand = conv1x1(channels, 2 * channels)
        self.local = depthwise3x3(2 * channels)
        self.gate = SimpleGate()
        # Simplified channel attention: a per-channel gain from the global mean, no nonlinearity.
        self.channel_gain = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1))
        self.project = conv1x1(channels, channels)
        self.norm2 = LayerNorm2d(channels)
        hidden = int(channels * ffn_expansion_factor) // 2
        self.ffn = nn.Sequential(
            conv1x1(channels, 2 * hidden), SimpleGate(), conv1x1(hidden, channels)
        )
        # NAFNet's beta and gamma: residual branches start closed, so a deep stack starts as the
        # identity and each block opens as far as training finds it useful.
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.gate(self.local(self.expand(self.norm1(x))))
        x = x + self.beta * self.project(y * self.channel_gain(y))
        return x + self.gamma * self.ffn(self.norm2(x))


class ResBlock(nn.Module):
    """SRResNet's block without batch norm (as EDSR): conv, ReLU, conv, plus the input.

    Dense 3x3 convolutions are what a CPU computes fastest per useful operation (no depthwise
    convs, no per-pixel norms), which makes this the block that learns most per CPU minute."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(channels, channels, 3, padding=1)
        self.project = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.project(F.relu(self.expand(x)))


class ResUNet(nn.Module):
    """A residual-conv U-Net built for CPUs, with the interface of :class:`UNet`.

    Where Restormer's U-Net spends most of its work at the top (a decoder and a refinement at
    twice the width), this one keeps every level's width: dim at the top, doubling per level,
    strided-conv down, transposed-conv up, skips added rather than concatenated. With a stem of 2
    (pixel unshuffle) it trained about 2.5x faster per sample than the UNet with the same blocks,
    and learned as much per step (benchmarks/quality.py). ``num_blocks``: per level, the last the
    latent; the decoder mirrors the encoder."""

    def __init__(
        self,
        dim: int,
        num_blocks: Sequence[int],
        make_block: BlockFactory,
        prompt_dim: int = 0,
        stem: int = 2,
    ) -> None:
        super().__init__()
        if len(num_blocks) < 2:
            raise ValueError(f"num_blocks needs a count per level, latent last, got {num_blocks}")
        self.stem = stem
        widths = [dim * 2**level for level in range(len(num_blocks))]

        def stage(level: int) -> Stage:
            blocks = [make_block(widths[level], level) for _ in range(num_blocks[level])]
            return Stage(blocks, widths[level], prompt_dim)

        self.embed = nn.Conv2d(3 * stem * stem, dim, 3, padding=1)
        levels = range(len(widths) - 1)
        self.encoders = nn.ModuleList(stage(i) for i in levels)
        self.downs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 2, stride=2) for i in levels)
        self.latent = stage(len(widths) - 1)
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(levels)
        )
        self.decoders = nn.ModuleList(stage(i) for i in reversed(levels))
        self.output = nn.Conv2d(dim, 3 * stem * stem, 3, padding=1)
        self.size_multiple = stem * 2 ** (len(widths) - 1)

    def forward(self, x: Tensor, prompt: Tensor | None = None) -> Tensor:
        h = self.embed(F.pixel_unshuffle(x, self.stem) if self.stem > 1 else x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            h = encoder(h, prompt)
            skips.append(h)
            h = down(h)
        h = self.latent(h, prompt)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            h = decoder(up(h) + skip, prompt)
        residual = self.output(h)
        return F.pixel_shuffle(residual, self.stem) if self.stem > 1 else residual


def resnet_blocks() -> BlockFactory:
    return lambda channels, level: ResBlock(channels)


def restormer_blocks(heads: Sequence[int], ffn_expansion_factor: float) -> BlockFactory:
    if len(heads) != 4:
        raise ValueError(f"heads needs one count per level (4), got {list(heads)}")
    return lambda channels, level: TransformerBlock(channels, heads[level], ffn_expansion_factor)


def nafnet_blocks(ffn_expansion_factor: float) -> BlockFactory:
    return lambda channels, level: NAFBlock(channels, ffn_expansion_factor)


class Downsample(nn.Module):
    """Halve the resolution, double the channels; PixelUnshuffle keeps every pixel (no striding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3x3(channels, channels // 2), nn.PixelUnshuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double the resolution, halve the channels; PixelShuffle avoids deconv checkerboards."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3x3(channels, channels * 2), nn.PixelShuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Stage(nn.Module):
    """A run of blocks at one resolution.

    With ``prompt_dim > 0`` a prompt vector scales and shifts each block's output (FiLM): the
    cheapest way to let one vector steer every layer, and how MiOIR's prompts enter the backbone.
    """

    def __init__(self, blocks: list[nn.Module], channels: int, prompt_dim: int = 0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.prompt_films = nn.ModuleList(
            nn.Linear(prompt_dim, 2 * channels) for _ in (blocks if prompt_dim else [])
        )
        for film in self.prompt_films:
            # Small enough that an untrained prompt barely perturbs the backbone (scale ~ 0.1).
            nn.init.normal_(film.weight, std=0.1 / prompt_dim**0.5)
            nn.init.zeros_(film.bias)

    def forward(self, x: Tensor, prompt: Tensor | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if prompt is not None:
                scale, shift = self.prompt_films[i](prompt)[..., None, None].chunk(2, dim=1)
                x = x * (1 + scale) + shift
        return x


class UNet(nn.Module):
    """Restormer's 4-level U-Net, predicting a residual to add to the input.

    Channels are dim, 2dim, 4dim, 8dim from the top level down to the latent (1/8 of the top).
    Skips are concatenated; the top decoder and the refinement keep the concatenated 2dim channels,
    as in Restormer, because that is where the fine detail is rebuilt.

    ``stem`` > 1 folds each stem x stem patch into channels first (pixel unshuffle, as FFDNet does)
    so every level runs at 1/stem of the resolution: stem 2 costs about a quarter per pixel. Inputs
    must be a multiple of 8 x stem in height and width (:func:`UNet.multiple`).
    """

    size_multiple = 8

    @staticmethod
    def multiple(stem: int = 1) -> int:
        return UNet.size_multiple * stem

    def __init__(
        self,
        dim: int,
        num_blocks: Sequence[int],
        num_refinement_blocks: int,
        make_block: BlockFactory,
        prompt_dim: int = 0,
        stem: int = 1,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"num_blocks needs one count per level (4), got {list(num_blocks)}")
        if stem < 1:
            raise ValueError(f"stem must be 1 (none) or a folding factor >= 2, got {stem}")
        self.dim, self.stem = dim, stem

        def stage(channels: int, level: int, count: int) -> Stage:
            return Stage([make_block(channels, level) for _ in range(count)], channels, prompt_dim)

        widths = [dim * 2**level for level in range(4)]
        self.embed = conv3x3(3 * stem * stem, dim)
        self.encoders = nn.ModuleList(stage(widths[i], i, num_blocks[i]) for i in range(3))
        self.downs = nn.ModuleList(Downsample(widths[i]) for i in range(3))
        self.latent = stage(widths[3], 3, num_blocks[3])
        # Decoder, deepest first: upsample, concatenate the skip, fuse the channels, refine.
        self.ups = nn.ModuleList(Upsample(widths[i + 1]) for i in (2, 1, 0))
        self.fuse = nn.ModuleList(
            [conv1x1(widths[3], widths[2]), conv1x1(widths[2], widths[1]), nn.Identity()]
        )
        self.decoders = nn.ModuleList(
            stage(channels, level, num_blocks[level])
            for channels, level in ((widths[2], 2), (widths[1], 1), (widths[1], 0))
        )
        self.refinement = stage(widths[1], 0, num_refinement_blocks)
        self.output = conv3x3(widths[1], 3 * stem * stem)

    def decoder_channels(self, level: int) -> int:
        """Channels of the decoder feature that is upsampled into ``level`` (1..3)."""
        return self.dim * 2**level

    def encode(self, x: Tensor, prompt: Tensor | None = None) -> list[Tensor]:
        """Features of levels 1..4 (full, 1/2, 1/4 resolution, then the 1/8 latent)."""
        features = []
        h = self.embed(F.pixel_unshuffle(x, self.stem) if self.stem > 1 else x)
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            h = encoder(h, prompt)
            features.append(h)
            h = down(h)
        features.append(self.latent(h, prompt))
        return features

    def decode(
        self,
        features: list[Tensor],
        prompt: Tensor | None = None,
        before_up: Callable[[int, Tensor], Tensor] | None = None,
    ) -> Tensor:
        """The residual image. ``before_up(level, h)`` may rewrite the feature about to be
        upsampled into ``level`` (3: the latent, 2, 1), which is where PromptIR adds its prompts."""
        h = features[3]
        for level, up, fuse, decoder in zip(
            (3, 2, 1), self.ups, self.fuse, self.decoders, strict=True
        ):
            if before_up is not None:
                h = before_up(level, h)
            h = decoder(fuse(torch.cat([up(h), features[level - 1]], dim=1)), prompt)
        residual = self.output(self.refinement(h, prompt))
        return F.pixel_shuffle(residual, self.stem) if self.stem > 1 else residual

    def forward(self, x: Tensor, prompt: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(x, prompt), prompt)
