"""Restormer's building blocks (Zamir et al., CVPR 2022) under the attribute names of its official
code, which PromptIR, AdaIR and MiOIR's Restormer backbone build on unchanged.

Keeping the official names makes a released checkpoint's keys ours as they are: importing one is a
matter of stripping a wrapper prefix, never of renaming tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Backbone sizes shared by the presets of every Restormer-based model: the paper's is Restormer's
# own, which PromptIR, AdaIR, MiOIR and PIP all keep.
RESTORMER_TINY = {
    "dim": 16,
    "num_blocks": [1, 1, 1, 2],
    "num_refinement_blocks": 1,
    "heads": [1, 1, 2, 2],
    "ffn_expansion_factor": 2.0,
}
RESTORMER_PAPER = {
    "dim": 48,
    "num_blocks": [4, 6, 6, 8],
    "num_refinement_blocks": 4,
    "heads": [1, 2, 4, 8],
    "ffn_expansion_factor": 2.66,
}


class _WithBiasNorm(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:  # x: (..., C)
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class _BiasFreeNorm(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        # The official bias-free norm divides by the spread around the mean without subtracting it.
        var = x.var(-1, keepdim=True, unbiased=False)
        return x / torch.sqrt(var + 1e-5) * self.weight


class LayerNorm(nn.Module):
    """Layer norm over the channels of each pixel of an (N, C, H, W) map (weights in ``body``)."""

    def __init__(self, channels: int, norm_type: str = "WithBias") -> None:
        super().__init__()
        if norm_type not in ("WithBias", "BiasFree"):
            raise ValueError(f"norm_type must be 'WithBias' or 'BiasFree', not {norm_type!r}")
        self.body = _BiasFreeNorm(channels) if norm_type == "BiasFree" else _WithBiasNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FeedForward(nn.Module):
    """Gated-Dconv feed-forward network: GELU(dwconv half) x other half."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool = False) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


def transposed_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, temperature: Tensor
) -> Tensor:
    """Attention across channels, not pixels: a (C/heads x C/heads) map per head, so the cost
    grows linearly with the image size. q, k, v: (N, C, H, W)."""
    n, c, h, w = q.shape
    q, k, v = (t.reshape(n, heads, c // heads, h * w) for t in (q, k, v))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1) * temperature).softmax(dim=-1)
    return (attn @ v).reshape(n, c, h, w)


class Attention(nn.Module):
    """Multi-Dconv head transposed attention (MDTA)."""

    def __init__(self, dim: int, num_heads: int, bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return self.project_out(transposed_attention(q, k, v, self.num_heads, self.temperature))


class TransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_expansion_factor: float,
        bias: bool = False,
        norm_type: str = "WithBias",
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, norm_type)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, norm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def transformer_stage(
    dim: int, heads: int, blocks: int, ffn_expansion_factor: float, bias: bool, norm_type: str
) -> nn.Sequential:
    """``blocks`` TransformerBlocks in a row, keyed 0..blocks-1 as the official code has them."""
    return nn.Sequential(
        *(
            TransformerBlock(dim, heads, ffn_expansion_factor, bias, norm_type)
            for _ in range(blocks)
        )
    )


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_channels: int = 3, embed_dim: int = 48, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, 3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halves the resolution, doubles the channels: conv to C/2, then pixel-unshuffle by 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Doubles the resolution, halves the channels: conv to 2C, then pixel-shuffle by 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels * 2, 3, padding=1, bias=False), nn.PixelShuffle(2)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)
