"""AM-PromptIR (buuzhangsen/AM-PromptIR) as its official code builds it (``net/model.py`` at
e3da34bd, the newer of the two versions we could read; the older, 11c2b32, has Restormer's gated
feed-forward instead): PromptIR's U-Net with a mixed-scale feed-forward in every transformer block,
channel + spatial attention fusing the skips, and prompts that also read the degradation's text.

What the paper calls its parts, found in the code (which names none of them; our reading):
- AMPG, the adaptive multimodal prompt, is :class:`PromptGenBlock` at three decoder points: the
  image's pooled features weigh 5 learned prompts (PromptIR's visual prompt); the degradation's
  name, as CLIP BPE token ids, is the text prompt; :class:`MixedAttention` fuses the two.
- The simplified mixed attention is that fusion (official ``FreRefine``): a spatial gate (CBAM's,
  from the text map) on the visual prompt plus a channel gate (from the visual prompt) on the text
  map. The transformer blocks mix scales too (3x3 and 5x5 depthwise branches in the feed-forward).
- FEFM is the official ``Feature_Refinement_Block`` (:class:`FeatureEnhancementFusion`): it fuses
  each skip concatenation in place of PromptIR's 1x1 reduction, and refines the last features.

Where the paper and the code part, this follows the code:
- "A pre-trained language-image model" is, in the code, CLIP's tokenizer only: the token ids
  themselves (as floats) go through a trainable Linear; no CLIP weights exist in the network,
  so there is nothing to freeze or download (open_clip bundles the same BPE vocabulary). The text
  map has the same value in every channel, so after the channel L2 norm only the sign of each
  Linear output survives, and that Linear's gradient is nil (~1e-10: the norm is flat there).
- The text map is built the official way for a batch: row ``h`` reads image ``h mod N``'s text
  and column ``w`` entry ``w mod C``; with N > 1 the images of a batch share one map.
- The code needs the label: training and testing hand every image its degradation's name. Blind
  restoration is an option here (``blind=True``: a linear head on the pooled latent chooses the
  text; its logits train against the label); with neither, restoring without a task is an error.

The published repository does not run as it stands: ``train.py`` imports ``AM_PromptIR``, which
``net/model.py`` calls ``PromptIR``, and its ``lr_scheduler_step`` takes a stray third argument
Lightning never passes; ``test.py`` imports the missing ``net.test1``. None of it touches the
network. The authors released no checkpoint, only restored images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import open_clip
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
from allinone.models.restormer import Attention, Downsample, LayerNorm, OverlapPatchEmbed, Upsample

# The names the official data loaders give each degradation (utils/dataset_utils.py). Its training
# set tells three noise levels apart; our one "denoise" task spans them, so it reads the middle.
# (Its test script would label hazy images "derain": DerainDehazeDataset.set_dataset never updates
# the name; the texts here are the training ones, the texts its weights learned.)
OFFICIAL_TEXTS: dict[str, str] = {"denoise": "denoise_25", "derain": "derain", "dehaze": "dehazy"}


def degradation_texts(task_names: Sequence[str], overrides: Mapping[str, str]) -> list[str]:
    """One text per task: ``overrides``, else the official name, else the task's own name."""
    return [overrides.get(n, OFFICIAL_TEXTS.get(n, n)) for n in task_names]


def tokenize(texts: Sequence[str], context_length: int) -> Tensor:
    """CLIP BPE token ids (len(texts), context_length), truncated ending in the end token: what
    OpenAI's ``clip.tokenize(..., truncate=True)`` gives, from open_clip's copy of the tokenizer."""
    return open_clip.tokenize(list(texts), context_length=context_length)


def frequency_l1(restored: Tensor, target: Tensor) -> Tensor:
    """The official ``Fu_loss``: ``nn.L1Loss`` between ``torch.fft.fft2`` of both, i.e. the mean
    over N, C, H, W of the complex modulus of the spectra's difference (full 2-D FFT, unnormalised;
    not the amplitude's difference, not real and imaginary parts apart)."""
    return (torch.fft.fft2(restored.float()) - torch.fft.fft2(target.float())).abs().mean()


class MixedScaleFeedForward(nn.Module):
    """3x3 and 5x5 depthwise branches, ReLU, crossed and merged (official ``FeedForward``)."""

    def __init__(self, dim: int, ffn_expansion_factor: float) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=False)
        self.dwconv3x3 = nn.Conv2d(
            hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=False
        )
        self.dwconv5x5 = nn.Conv2d(
            hidden * 2, hidden * 2, 5, padding=2, groups=hidden * 2, bias=False
        )
        self.dwconv3x3_1 = nn.Conv2d(hidden * 2, hidden, 3, padding=1, groups=hidden, bias=False)
        self.dwconv5x5_1 = nn.Conv2d(hidden * 2, hidden, 5, padding=2, groups=hidden, bias=False)
        self.project_out = nn.Conv2d(hidden * 2, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.project_in(x)
        a3, b3 = F.relu(self.dwconv3x3(x)).chunk(2, dim=1)
        a5, b5 = F.relu(self.dwconv5x5(x)).chunk(2, dim=1)
        # Each second-stage conv sees one half of both scales.
        first = F.relu(self.dwconv3x3_1(torch.cat([a3, a5], dim=1)))
        second = F.relu(self.dwconv5x5_1(torch.cat([b3, b5], dim=1)))
        return self.project_out(torch.cat([first, second], dim=1))


class TransformerBlock(nn.Module):
    """Restormer's block (MDTA, bias-free convs, WithBias norms) with the mixed-scale FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.ffn = MixedScaleFeedForward(dim, ffn_expansion_factor)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def stage(dim: int, heads: int, blocks: int, ffn_expansion_factor: float) -> nn.Sequential:
    return nn.Sequential(
        *(TransformerBlock(dim, heads, ffn_expansion_factor) for _ in range(blocks))
    )


class FeatureEnhancementFusion(nn.Module):
    """FEFM (official ``Feature_Refinement_Block``): a spatial attention map ``t`` chooses, per
    pixel and channel, between a 1x1 projection of the input and its channel attention vector."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 8) -> None:
        super().__init__()
        self.ca = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, in_channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels // reduction, out_channels, 1),
            nn.Sigmoid(),
        )
        self.sa = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.Conv2d(out_channels, out_channels // 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels // 8, out_channels, 3, padding=1),
            nn.Sigmoid(),
        )
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        t = self.sa(x)
        return (1 - t) * self.ca(x) + t * self.conv1(x)


class SpatialGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.max(dim=1, keepdim=True).values, x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))


class ChannelGate(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, channels // 16, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(channels // 16, channels, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        average = self.mlp(x.mean(dim=(-2, -1), keepdim=True))
        maximum = self.mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(average + maximum)


class MixedAttention(nn.Module):
    """The visual prompt gated by where the text map points, plus the text map gated by which
    channels the visual prompt holds (official ``FreRefine``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.SpatialGate = SpatialGate()
        self.ChannelGate = ChannelGate(channels)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, visual: Tensor, text: Tensor) -> Tensor:
        return self.proj(visual * self.SpatialGate(text) + text * self.ChannelGate(visual))


class PromptGenBlock(nn.Module):
    """AMPG at one decoder point: a prompt as wide as the features it is concatenated to.

    ``texts`` holds one degradation text per task; they are tokenized once, to C/2 tokens each
    (C the features' width, as the official ``context_length=C//2``).
    """

    def __init__(
        self, channels: int, prompt_len: int, prompt_size: int, texts: Sequence[str]
    ) -> None:
        super().__init__()
        # Uniform [0, 1) as in the official code: every component starts positive and comparable.
        self.prompt_param = nn.Parameter(
            torch.rand(1, prompt_len, channels, prompt_size, prompt_size)
        )
        self.linear_layer = nn.Linear(channels, prompt_len)
        self.conv3x3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.linear_text = nn.Linear(channels // 2, channels)
        self.frequency_refine = MixedAttention(channels)
        self.rate_conv = nn.Sequential(
            nn.Conv2d(channels, channels // 8, 1),
            nn.GELU(),
            nn.Conv2d(channels // 8, channels, 1),
        )
        # The prompt's scale and a residual share of the features; starts as the bare prompt.
        self.para1 = nn.Parameter(torch.zeros(channels, 1, 1))
        self.para2 = nn.Parameter(torch.ones(channels, 1, 1))
        # Not in state_dict: fixed by the texts, and absent from the official checkpoint.
        self.register_buffer("text_tokens", tokenize(texts, channels // 2), persistent=False)

    def text_map(self, text_index: Tensor, height: int, width: int) -> Tensor:
        """(1, C, H, W): the official layout of the batch's text vectors (module docstring)."""
        vectors = self.linear_text(self.text_tokens[text_index].float())  # (N, C)
        n, channels = vectors.shape
        rows = torch.arange(height, device=vectors.device) % n
        cols = torch.arange(width, device=vectors.device) % channels
        grid = vectors[rows][:, cols].expand(1, channels, height, width)
        return self.rate_conv(F.normalize(grid, dim=1))

    def forward(self, x: Tensor, text_index: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        weights = self.linear_layer(x.mean(dim=(-2, -1))).softmax(dim=1)  # (N, L)
        prompt = (weights[:, :, None, None, None] * self.prompt_param).sum(dim=1)
        prompt = F.interpolate(prompt, size=(height, width), mode="bilinear", align_corners=False)
        prompt = self.frequency_refine(prompt, self.text_map(text_index, height, width))
        return self.conv3x3(prompt) * self.para2 + x * self.para1


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


_PAPER = {
    "dim": 48,
    "num_blocks": [2, 4, 4, 8],
    "num_refinement_blocks": 2,
    "heads": [1, 2, 4, 8],
    "ffn_expansion_factor": 2.66,
    "prompt_len": 5,
    "prompt_sizes": [64, 32, 16],
}
_TINY = {
    "dim": 8,
    "num_blocks": [1, 1, 1, 1],
    "num_refinement_blocks": 1,
    "heads": [1, 1, 2, 2],
    "ffn_expansion_factor": 2.0,
    "prompt_len": 5,
    "prompt_sizes": [16, 8, 4],
}


@register_model(
    "am_promptir",
    presets={"tiny": _TINY, "paper": _PAPER},
    description="AM-PromptIR (official): PromptIR U-Net + FEFM skips, prompts read the task's text",
    official=OfficialRelease(
        repository="buuzhangsen/AM-PromptIR",
        parameters=48_425_687,
        weights=(
            "none released (its README offers restored images only); a checkpoint of its "
            "train.py imports: Lightning, {'state_dict': {'net.<key>': ...}}"
        ),
    ),
)
class AMPromptIR(RestorationModel):
    """``prompt_sizes`` are prompts 1, 2, 3 (3 reads the latent). ``task_texts`` maps a task name
    to the text its images are described by (default :data:`OFFICIAL_TEXTS`, else the name)."""

    size_multiple = 8  # three 2x pixel-unshuffles
    default_aux_weights = {"fft": 0.01}  # the official train.py: charbonnier + 0.01 * Fu_loss

    def __init__(
        self,
        dim: int = 48,
        num_blocks: Sequence[int] = (2, 4, 4, 8),
        num_refinement_blocks: int = 2,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        prompt_len: int = 5,
        prompt_sizes: Sequence[int] = (64, 32, 16),
        task_texts: Mapping[str, str] | None = None,
        blind: bool = False,
        task_names: Sequence[str] = DEFAULT_TASKS,
    ) -> None:
        super().__init__(tuple(task_names))
        if len(prompt_sizes) != 3:
            raise ValueError(f"prompt_sizes needs one size per prompt (3), got {prompt_sizes}")
        self.texts = degradation_texts(self.task_names, task_texts or {})
        ffn = ffn_expansion_factor
        # Registered in the official order, so that state_dict() lists the official keys in turn.
        self.patch_embed = OverlapPatchEmbed(3, dim)
        for level, size in zip((1, 2, 3), prompt_sizes, strict=True):
            prompt = PromptGenBlock(dim * 2**level, prompt_len, size, self.texts)
            setattr(self, f"prompt{level}", prompt)
        self.reduce_noise_channel_1 = conv1x1(dim * 2, dim)
        self.encoder_level1 = stage(dim, heads[0], num_blocks[0], ffn)
        self.down1_2 = Downsample(dim)
        self.reduce_noise_channel_2 = conv1x1(dim * 4, dim * 2)
        self.encoder_level2 = stage(dim * 2, heads[1], num_blocks[1], ffn)
        self.down2_3 = Downsample(dim * 2)
        self.reduce_noise_channel_3 = conv1x1(dim * 8, dim * 4)
        self.encoder_level3 = stage(dim * 4, heads[2], num_blocks[2], ffn)
        self.down3_4 = Downsample(dim * 4)
        self.latent = stage(dim * 8, heads[3], num_blocks[3], ffn)
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = conv1x1(dim * 8, dim * 4)
        # Every prompt's interaction block has level 3's head count, as in the official code.
        self.noise_level3 = TransformerBlock(dim * 16, heads[2], ffn)
        self.reduce_noise_level3 = conv1x1(dim * 16, dim * 8)
        self.decoder_level3 = stage(dim * 4, heads[2], num_blocks[2], ffn)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = conv1x1(dim * 4, dim * 2)
        self.noise_level2 = TransformerBlock(dim * 8, heads[2], ffn)
        self.reduce_noise_level2 = conv1x1(dim * 8, dim * 4)
        self.decoder_level2 = stage(dim * 2, heads[1], num_blocks[1], ffn)
        self.up2_1 = Upsample(dim * 2)
        self.noise_level1 = TransformerBlock(dim * 4, heads[2], ffn)
        self.reduce_noise_level1 = conv1x1(dim * 4, dim * 2)
        self.decoder_level1 = stage(dim * 2, heads[0], num_blocks[0], ffn)
        self.refinement = stage(dim * 2, heads[0], num_refinement_blocks, ffn)
        self.output = conv1x1(dim * 2, 3)
        self.Feature_Refinement1 = FeatureEnhancementFusion(dim * 2, dim * 2)
        self.Feature_Refinement2 = FeatureEnhancementFusion(dim * 4, dim * 2)
        self.Feature_Refinement3 = FeatureEnhancementFusion(dim * 8, dim * 4)
        self._freeze_uncalled_convolutions()
        self.degradation_head = nn.Linear(dim * 8, self.num_tasks) if blind else None
        self.needs_task = not blind

    def _freeze_uncalled_convolutions(self) -> None:
        """Five 1x1 convolutions the official builds and its forward never calls (188,928
        parameters at the paper's sizes; FEFM replaced the two skip reductions). They stay so that
        the parameter count and the checkpoint's keys are the official ones, frozen: no gradient
        ever reached them in official training either."""
        for name in (
            "reduce_noise_channel_1",
            "reduce_noise_channel_2",
            "reduce_noise_channel_3",
            "reduce_chan_level3",
            "reduce_chan_level2",
        ):
            getattr(self, name).requires_grad_(False)

    def _prompted(self, level: int, features: Tensor, text_index: Tensor) -> Tensor:
        prompt = getattr(self, f"prompt{level}")(features, text_index)
        fused = getattr(self, f"noise_level{level}")(torch.cat([features, prompt], dim=1))
        return getattr(self, f"reduce_noise_level{level}")(fused)

    def _text_index(self, task_id: Tensor | None, logits: Tensor | None) -> Tensor:
        if task_id is not None:
            return task_id.long()
        return logits.argmax(dim=-1)

    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        if task_id is None and self.degradation_head is None:
            raise ValueError(
                "am_promptir needs the task of the images (task_id, or --task): its prompts read "
                "the degradation's text, as in the official training and testing; build it with "
                "blind=True to have it predict the task from the image instead"
            )
        enc1 = self.encoder_level1(self.patch_embed(x))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))
        head = self.degradation_head
        logits = None if head is None else head(latent.mean(dim=(-2, -1)))
        text_index = self._text_index(task_id, logits)

        latent = self._prompted(3, latent, text_index)
        dec3 = self.Feature_Refinement3(torch.cat([self.up4_3(latent), enc3], dim=1))
        dec3 = self._prompted(2, self.decoder_level3(dec3), text_index)
        dec2 = self.Feature_Refinement2(torch.cat([self.up3_2(dec3), enc2], dim=1))
        dec2 = self._prompted(1, self.decoder_level2(dec2), text_index)
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], dim=1))
        dec1 = self.Feature_Refinement1(self.refinement(dec1))
        return Restoration(self.output(dec1) + x, logits=logits)

    def supervised_terms(self, restored: Tensor, target: Tensor) -> dict[str, Tensor]:
        return {"fft": frequency_l1(restored, target)}
