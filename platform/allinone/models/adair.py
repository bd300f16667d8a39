"""AdaIR (Cui et al., ICLR 2025) as its official code builds it (c-yn/AdaIR, ``net/model.py``):
adaptive all-in-one restoration by frequency mining and modulation.

The U-Net is PromptIR's (AdaIR's code is a fork of it) without prompts. At the same three decoder
points an adaptive frequency learning block (AFLB, ``FreModule`` in the code) takes the degraded
image, resized to the features: it splits the image's features into a low band (a centred box of
the spectrum whose size the features choose) and the high rest, lets each band cross-attend to the
decoder features, modulates the bands by each other (FreRefine: the high band's spatial gate
weights the low, the low band's channel gate the high), and adds the result back through a
learned scale that starts at zero. Like PromptIR it is blind: no task id.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allinone.models.base import DEFAULT_TASKS, OfficialRelease, register_model
from allinone.models.promptir import RestormerUNet, conv1x1
from allinone.models.restormer import RESTORMER_PAPER, RESTORMER_TINY, transposed_attention

# The official band split sizes the low-frequency box in units of 1/128 of the feature map, and
# truncates: a map under 2 x 128 pixels on a side always gets an empty low band (low = 0).
_BAND_UNIT = 128


class ChannelCrossAttention(nn.Module):
    """Transposed (channel) attention with queries from one map, keys and values from another."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_head = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = conv1x1(dim, dim)
        self.q_dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.kv = conv1x1(dim, dim * 2)
        self.kv_dwconv = nn.Conv2d(dim * 2, dim * 2, 3, padding=1, groups=dim * 2, bias=False)
        self.project_out = conv1x1(dim, dim)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        q = self.q_dwconv(self.q(x))
        k, v = self.kv_dwconv(self.kv(y)).chunk(2, dim=1)
        return self.project_out(transposed_attention(q, k, v, self.num_head, self.temperature))


class SpatialGate(nn.Module):
    """A per-pixel weight in (0, 1) from the channel max and mean (the paper's H-L unit)."""

    def __init__(self) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.max(dim=1, keepdim=True)[0], x.mean(dim=1, keepdim=True)], dim=1)
        return self.spatial(pooled).sigmoid()


class ChannelGate(nn.Module):
    """A per-channel weight in (0, 1) from the global average and max (the paper's L-H unit)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(conv1x1(dim, dim // 16), nn.ReLU(), conv1x1(dim // 16, dim))

    def forward(self, x: Tensor) -> Tensor:
        average = self.mlp(F.adaptive_avg_pool2d(x, 1))
        return (average + self.mlp(F.adaptive_max_pool2d(x, 1))).sigmoid()


class FreRefine(nn.Module):
    """Frequency modulation (FMoM): each band gated by the other, summed, projected."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.SpatialGate = SpatialGate()
        self.ChannelGate = ChannelGate(dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        return self.proj(low * self.SpatialGate(high) + high * self.ChannelGate(low))


class FreModule(nn.Module):
    """Adaptive frequency learning block (AFLB) on decoder features of ``dim`` channels."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        # Built by the official code, never called by its forward: kept, frozen, for the official
        # parameter count and checkpoint keys.
        self.conv = nn.Conv2d(3, dim, 3, padding=1, bias=False).requires_grad_(False)
        self.conv1 = nn.Conv2d(3, dim, 3, padding=1, bias=False)
        self.score_gen = nn.Conv2d(2, 2, 7, padding=3).requires_grad_(False)
        self.para1 = nn.Parameter(torch.zeros(dim, 1, 1))
        self.para2 = nn.Parameter(torch.ones(dim, 1, 1))
        # The official pairs channel_cross_l with the high band and _h with the low; the names
        # stay as its checkpoint has them.
        self.channel_cross_l = ChannelCrossAttention(dim, num_heads)
        self.channel_cross_h = ChannelCrossAttention(dim, num_heads)
        self.channel_cross_agg = ChannelCrossAttention(dim, num_heads)
        self.frequency_refine = FreRefine(dim)
        # Its output only sizes the low band through an integer cast, so no gradient ever reaches
        # it: official training never changed it, and frozen it needs no unused-parameter search.
        self.rate_conv = nn.Sequential(
            conv1x1(dim, dim // 8), nn.GELU(), conv1x1(dim // 8, 2)
        ).requires_grad_(False)

    def forward(self, image: Tensor, features: Tensor) -> Tensor:
        image = F.interpolate(image, size=features.shape[-2:], mode="bilinear", align_corners=False)
        high, low = self.bands(self.conv1(image))
        high = self.channel_cross_l(high, features)
        low = self.channel_cross_h(low, features)
        mined = self.channel_cross_agg(features, self.frequency_refine(low, high))
        return mined * self.para1 + features * self.para2

    def bands(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(high, low): magnitudes of the inverse FFT of the spectrum outside / inside the box."""
        low_band = self._low_band(x).to(x.dtype)
        spectrum = torch.fft.fft2(x, norm="forward")
        high = torch.fft.ifft2(spectrum * (1 - low_band), norm="forward").abs()
        low = torch.fft.ifft2(spectrum * low_band, norm="forward").abs()
        return high, low

    def _low_band(self, x: Tensor) -> Tensor:
        """(N, 1, H, W) mask of each image's low-frequency box, in unshifted FFT order."""
        n, _, height, width = x.shape
        rate = self.rate_conv(F.adaptive_avg_pool2d(x, 1)).sigmoid().reshape(n, 2)
        half_h = (height // _BAND_UNIT * rate[:, 0]).int()
        half_w = (width // _BAND_UNIT * rate[:, 1]).int()
        rows = _centred_span(height, half_h, x.device)  # (N, H)
        cols = _centred_span(width, half_w, x.device)  # (N, W)
        box = rows[:, :, None] & cols[:, None, :]
        # The official builds the box on the spectrum rolled by half its size (DC at the centre)
        # and rolls back; rolling the box instead multiplies the same numbers.
        return box.roll((-(height // 2), -(width // 2)), dims=(1, 2))[:, None]


def _centred_span(size: int, half: Tensor, device: torch.device) -> Tensor:
    """(N, size) booleans: index i lies in [size // 2 - half, size // 2 + half)."""
    index = torch.arange(size, device=device)
    centre = size // 2
    return (index >= centre - half[:, None]) & (index < centre + half[:, None])


_PAPER = {
    **RESTORMER_PAPER,
}
_TINY = {
    **RESTORMER_TINY,
}


@register_model(
    "adair",
    presets={"tiny": _TINY, "paper": _PAPER},
    description="AdaIR (official): Restormer U-Net, frequency mining and modulation at 3 points",
    official=OfficialRelease(
        repository="c-yn/AdaIR",
        parameters=28_784_824,
        weights=(
            "adair3d.ckpt (3 tasks) and adair5d.ckpt (5 tasks), Lightning checkpoints "
            "({'state_dict': {'net.<key>': ...}}), from the Google Drive folder c-yn/AdaIR's "
            "README links (https://drive.google.com/drive/folders/"
            "1x2LN4kWkO3S65jJlH-1INUFiYt8KFzPH)"
        ),
    ),
)
class AdaIR(RestormerUNet):
    def __init__(
        self,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        task_names: Sequence[str] = DEFAULT_TASKS,
    ) -> None:
        if dim < 8:
            raise ValueError(
                f"AdaIR needs dim >= 8 (its channel gates divide 2 x dim by 16), got {dim}"
            )
        super().__init__(
            dim,
            num_blocks,
            num_refinement_blocks,
            heads,
            ffn_expansion_factor,
            dim * 8,
            task_names,
        )
        # fre1 guides the latent, fre2 decoder level 3, fre3 decoder level 2; all with level 3's
        # head count, as in the official code.
        self.fre1 = FreModule(dim * 8, heads[2])
        self.fre2 = FreModule(dim * 4, heads[2])
        self.fre3 = FreModule(dim * 2, heads[2])

    def guide(self, point: int, image: Tensor, features: Tensor) -> Tensor:
        return getattr(self, f"fre{4 - point}")(image, features)

    def prompt_parameters(self) -> Iterator[nn.Parameter]:
        """AdaIR's adaptive machinery is its frequency blocks: it has no prompts by name."""
        return (p for name, p in self.named_parameters() if name.startswith("fre"))
