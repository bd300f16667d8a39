"""PIP, Prompt-In-Prompt learning (Li et al., 2023), on Restormer, as its official code builds it.

The network is ``PIPNet_Restormer_onskip_inter`` of longzilicart/pip_universal in the configuration
its main trainer (``Main_trainer.py``) builds, under the official attribute names, so a checkpoint
saved by that code loads as it is. Each of the three encoder skips gets one PIP module:

- prompt-to-prompt (``prompt1..3``): the task's degradation-aware prompt (a C-vector per task,
  chosen by the task label) scales the skip feature resized to the basic restoration prompt's grid;
  the basic prompt (C x S x S) cross-attends to that product, so the universal prompt depends on
  the image as well as the task; it is resized to the skip and refined by a 3x3 conv;
- prompt-to-feature (``low_prompt_interaction_level1..3``): the skip feature attends across channels
  to the universal prompt, keeping each channel's top-m keys at four ratios (1/2, 2/3, 3/4, 4/5)
  mixed by learned weights, then passes a dual-gated feed-forward network.

A hinge on positive cosines keeps the task prompts apart (``aux["orthogonality"]``).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    Downsample,
    FeedForward,
    LayerNorm,
    OverlapPatchEmbed,
    Upsample,
    transformer_stage,
)

# The main trainer's five degradation classes, in its label order (its dataset folds the three
# noise levels into one class): task id i selects the official checkpoint's task prompt i.
PIP_TASKS: tuple[str, ...] = ("denoise", "derain", "dehaze", "deblur", "lowlight")
# Keys kept per channel in prompt-to-feature, as fractions of the channels of a head; the official
# truncates int(C * r), i.e. floors C * num / den.
TOPM_RATIOS: tuple[tuple[int, int], ...] = ((1, 2), (2, 3), (3, 4), (4, 5))
# The official prompt-to-prompt block has these whatever the backbone.
P2P_HEADS, P2P_FFN_EXPANSION = 2, 2.66


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


def _depthwise3x3(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)


def _fit_channels(x: Tensor, channels: int) -> Tensor:
    """The first ``channels`` channels of ``x``, zero-padded where it has fewer."""
    x = x[:, :channels]
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))


def orthogonality(task_prompts: Tensor) -> Tensor:
    """0.01 x the sum over task pairs of relu(cos): only prompts closer than 90 degrees pay.

    The official ``angle`` regulariser (train.sh's ``--high_reg_loss angle``); (T, ...) prompts.
    """
    unit = F.normalize(task_prompts.flatten(1), dim=-1)
    cosines = unit @ unit.T
    upper = torch.ones_like(cosines, dtype=torch.bool).triu(diagonal=1)
    return 0.01 * cosines[upper].relu().sum()


class CrossAttention(nn.Module):
    """Channel-wise cross-attention: each query channel attends to the key map's channels (per
    head), so the cost grows linearly with the map's size."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.kv = _conv1x1(dim, dim * 2)
        self.kv_dwconv = _depthwise3x3(dim * 2)
        self.q = _conv1x1(dim, dim)
        self.q_dwconv = _depthwise3x3(dim)
        self.project_out = _conv1x1(dim, dim)

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        n, c, h, w = x_q.shape
        q = self.q_dwconv(self.q(x_q))
        k, v = self.kv_dwconv(self.kv(x_kv)).chunk(2, dim=1)
        q, k, v = (t.reshape(n, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        return self.project_out(self.attend(scores * self.temperature, v).reshape(n, c, h, w))

    def attend(self, scores: Tensor, v: Tensor) -> Tensor:
        return scores.softmax(dim=-1) @ v


class TopMCrossAttention(CrossAttention):
    """Each query channel keeps only its m best-scoring key channels, at every ratio of
    TOPM_RATIOS; the four sparse attentions are mixed by learned weights ``attn1..4``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        if dim // num_heads < 2:
            raise ValueError(
                f"top-m attention needs at least 2 channels per head, got {dim} / {num_heads}"
            )
        super().__init__(dim, num_heads)
        for i in range(1, len(TOPM_RATIOS) + 1):
            setattr(self, f"attn{i}", nn.Parameter(torch.tensor([0.2])))

    def attend(self, scores: Tensor, v: Tensor) -> Tensor:
        channels = scores.shape[-1]
        kept = [channels * num // den for num, den in TOPM_RATIOS]
        # One ranking serves every m: the m best are the first m of the sorted top-max(m).
        ranked = scores.topk(max(kept), dim=-1).indices
        out = torch.zeros_like(v)
        for i, m in enumerate(kept, 1):
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, ranked[..., :m], True)
            attn = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)
            out = out + (attn @ v) * getattr(self, f"attn{i}")
        return out


class DualGateFeedForward(FeedForward):
    """Restormer's gated FFN with both halves gating each other: GELU(a) b + GELU(b) a."""

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x2) * x1 + F.gelu(x1) * x2)


class PromptToPromptBlock(nn.Module):
    """The basic prompt (query) cross-attends to the task-and-image prompt, then an FFN."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm11 = LayerNorm(dim)
        self.norm12 = LayerNorm(dim)
        self.attn = CrossAttention(dim, P2P_HEADS)
        self.norm2 = LayerNorm(dim)
        self.ffn = FeedForward(dim, P2P_FFN_EXPANSION)

    def forward(self, x_q: Tensor, x_kv: Tensor) -> Tensor:
        x = x_q + self.attn(self.norm11(x_q), self.norm12(x_kv))
        return x + self.ffn(self.norm2(x))


class PromptInPrompt(nn.Module):
    """Task and basic prompts of one skip, fused into a universal prompt at the skip's size."""

    def __init__(self, num_tasks: int, prompt_dim: int, prompt_size: int) -> None:
        super().__init__()
        self.prompt_size = prompt_size
        self.detask_prompt_param = nn.Parameter(torch.randn(1, num_tasks, prompt_dim, 1, 1))
        self.low_prompt_param = nn.Parameter(torch.randn(1, prompt_dim, prompt_size, prompt_size))
        self.LGM = PromptToPromptBlock(prompt_dim)
        self.outconv = nn.Conv2d(prompt_dim, prompt_dim, 3, padding=1, bias=False)

    def task_prompts(self) -> Tensor:
        return self.detask_prompt_param[0, :, :, 0, 0]  # (T, C_p)

    def forward(self, skip: Tensor, task_weights: Tensor) -> Tensor:
        """The universal prompt (N, C_p, H, W) for a skip (N, C, H, W) and task weights (N, T)."""
        prompts = self.task_prompts()
        # The official takes the mean over tasks of weight x prompt: a one-hot label gives P_t / T.
        aware = (task_weights @ prompts / len(prompts))[:, :, None, None]
        size = (self.prompt_size, self.prompt_size)
        resized = F.interpolate(skip, size, mode="bilinear", align_corners=False)
        image_aware = aware * _fit_channels(resized, prompts.shape[1])
        basic = self.low_prompt_param.expand(len(skip), -1, -1, -1)
        universal = self.LGM(basic, image_aware)
        universal = F.interpolate(universal, skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.outconv(universal)


class TopMPromptToFeatureBlock(nn.Module):
    """The skip feature (query) attends to the universal prompt with top-m selection, then a
    dual-gated FFN. Feature and prompt widths may differ: the feature is cut or zero-padded to the
    prompt's width for the attention and brought back after (a 1x1 conv where it was padded)."""

    def __init__(self, channels: int, prompt_dim: int, num_heads: int, ffn_expansion: float):
        super().__init__()
        self.norm11 = LayerNorm(channels)
        self.norm12 = LayerNorm(prompt_dim)
        self.attn = TopMCrossAttention(prompt_dim, num_heads)
        self.reduce_channel = _conv1x1(prompt_dim, channels) if channels < prompt_dim else None
        self.norm2 = LayerNorm(channels)
        self.ffn = DualGateFeedForward(channels, ffn_expansion)

    def forward(self, feature: Tensor, prompt: Tensor) -> Tensor:
        # As the official: the attention's residual adds the normalised feature, not the feature.
        x, prompt = self.norm11(feature), self.norm12(prompt)
        width = prompt.shape[1]
        inter, stable = _fit_channels(x, width), x[:, width:]
        x = inter + self.attn(inter, prompt)
        x = torch.cat([x, stable], dim=1) if self.reduce_channel is None else self.reduce_channel(x)
        return x + self.ffn(self.norm2(x))


class PromptToFeature(nn.Module):
    """Holds the block under the official's name, so checkpoint keys line up."""

    def __init__(self, channels: int, prompt_dim: int, num_heads: int, ffn_expansion: float):
        super().__init__()
        self.prompt_transformer_cross = TopMPromptToFeatureBlock(
            channels, prompt_dim, num_heads, ffn_expansion
        )

    def forward(self, feature: Tensor, prompt: Tensor) -> Tensor:
        return self.prompt_transformer_cross(feature, prompt)


def _stage(channels: int, heads: int, blocks: int, ffn_expansion: float) -> nn.Sequential:
    return transformer_stage(channels, heads, blocks, ffn_expansion, False, "WithBias")


@register_model(
    "pip",
    presets={
        "tiny": {
            "dim": 16,
            "num_blocks": [1, 1, 1, 2],
            "num_refinement_blocks": 1,
            "heads": [1, 1, 2, 2],
            "ffn_expansion_factor": 2.0,
            "prompt_dims": [24, 48, 96],
            "prompt_sizes": [16, 8, 4],
        },
        "paper": {
            "dim": 48,
            "num_blocks": [4, 6, 6, 8],
            "num_refinement_blocks": 4,
            "heads": [1, 2, 4, 8],
            "ffn_expansion_factor": 2.66,
            "prompt_dims": [64, 128, 256],
            "prompt_sizes": [64, 32, 16],
            "task_names": PIP_TASKS,
        },
    },
    description="PIP: task x image universal prompts, top-m channel cross-attention on skips",
    official=OfficialRelease(
        repository="longzilicart/pip_universal",
        parameters=27_429_510,
        preset="paper",
        # None released (issue #6 asks; promised in 2024, still open). Its trainer saves
        # {"params": state_dict, "epoch": n} as <run>-net_<epoch>_epoch.pkl, keys as ours.
        weights="",
    ),
)
class PIP(RestorationModel):
    """PIP on Restormer. The task label guides it, as in the paper's training and testing.

    Without a label the official network raises (a separately trained classifier was to supply
    one). Here, ``blind=True`` adds a linear degradation head on the pooled latent whose softmax
    weights the task prompts when no label is given (its logits are returned for a loss against the
    label); otherwise an unlabelled image weighs every task prompt 1/T (weights that sum to one,
    as the official's mixed labels do).
    """

    size_multiple = 8
    default_aux_weights = {"orthogonality": 0.002}  # the official trainer's alpha

    def __init__(
        self,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        prompt_dims: Sequence[int] = (64, 128, 256),
        prompt_sizes: Sequence[int] = (64, 32, 16),
        blind: bool = False,
        task_names: Sequence[str] = DEFAULT_TASKS,
    ) -> None:
        super().__init__(tuple(task_names))
        if len(prompt_dims) != 3 or len(prompt_sizes) != 3:
            raise ValueError(
                f"prompt_dims and prompt_sizes need one value per skip (3), "
                f"got {list(prompt_dims)} and {list(prompt_sizes)}"
            )
        ffn = ffn_expansion_factor
        self.prompt1 = PromptInPrompt(self.num_tasks, prompt_dims[0], prompt_sizes[0])
        self.prompt2 = PromptInPrompt(self.num_tasks, prompt_dims[1], prompt_sizes[1])
        self.prompt3 = PromptInPrompt(self.num_tasks, prompt_dims[2], prompt_sizes[2])
        self.patch_embed = OverlapPatchEmbed(3, dim)
        # PIP halves the latent's channels before upsampling it (Restormer does not).
        self.chnl_reduce3 = _conv1x1(dim * 8, dim * 4)
        # The official builds these three (sized for feature + prompt) and never calls them; they
        # stay so that the parameter count and the checkpoint's keys are the official ones.
        self.reduce_noise_channel_1 = _conv1x1(dim + prompt_dims[0], dim)
        self.encoder_level1 = _stage(dim, heads[0], num_blocks[0], ffn)
        self.down1_2 = Downsample(dim)
        self.reduce_noise_channel_2 = _conv1x1(dim * 2 + prompt_dims[1], dim * 2)
        self.encoder_level2 = _stage(dim * 2, heads[1], num_blocks[1], ffn)
        self.down2_3 = Downsample(dim * 2)
        self.reduce_noise_channel_3 = _conv1x1(dim * 4 + prompt_dims[2], dim * 4)
        self.encoder_level3 = _stage(dim * 4, heads[2], num_blocks[2], ffn)
        self.down3_4 = Downsample(dim * 4)
        self.latent = _stage(dim * 8, heads[3], num_blocks[3], ffn)
        self.up4_3 = Upsample(dim * 4)
        # The official writes the input width as dim * 2 + 192, i.e. 2C + 4C at dim 48.
        self.reduce_chan_level3 = _conv1x1(dim * 2 + dim * 4, dim * 4)
        self.low_prompt_interaction_level3 = PromptToFeature(dim * 4, prompt_dims[2], heads[2], ffn)
        self.decoder_level3 = _stage(dim * 4, heads[2], num_blocks[2], ffn)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = _conv1x1(dim * 4, dim * 2)
        # Every prompt-to-feature block uses the third level's head count, as the official.
        self.low_prompt_interaction_level2 = PromptToFeature(dim * 2, prompt_dims[1], heads[2], ffn)
        self.decoder_level2 = _stage(dim * 2, heads[1], num_blocks[1], ffn)
        self.up2_1 = Upsample(dim * 2)
        self.low_prompt_interaction_level1 = PromptToFeature(dim, prompt_dims[0], heads[2], ffn)
        self.decoder_level1 = _stage(dim * 2, heads[0], num_blocks[0], ffn)
        self.refinement = _stage(dim * 2, heads[0], num_refinement_blocks, ffn)
        self.output = nn.Conv2d(dim * 2, 3, 3, padding=1, bias=False)
        self.degradation_head = nn.Linear(dim * 8, self.num_tasks) if blind else None

    def pip_modules(self) -> list[PromptInPrompt]:
        return [self.prompt1, self.prompt2, self.prompt3]

    def task_weights(self, task_id: Tensor | None, logits: Tensor | None, batch: int) -> Tensor:
        """(N, T): the label's one-hot, else the blind head's softmax, else uniform."""
        dtype = self.prompt1.detask_prompt_param.dtype
        if task_id is not None:
            return F.one_hot(task_id.long(), self.num_tasks).to(dtype)
        if logits is not None:
            return logits.softmax(dim=-1)
        device = self.prompt1.detask_prompt_param.device
        return torch.full((batch, self.num_tasks), 1 / self.num_tasks, dtype=dtype, device=device)

    def _prompted(self, level: int, skip: Tensor, weights: Tensor) -> Tensor:
        prompt = getattr(self, f"prompt{level}")(skip, weights)
        return getattr(self, f"low_prompt_interaction_level{level}")(skip, prompt)

    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        enc1 = self.encoder_level1(self.patch_embed(x))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))
        head = self.degradation_head
        logits = None if head is None else head(latent.mean(dim=(-2, -1)))
        weights = self.task_weights(task_id, logits, len(x))

        up3 = self.up4_3(self.chnl_reduce3(latent))
        dec3 = torch.cat([up3, self._prompted(3, enc3, weights)], dim=1)
        dec3 = self.decoder_level3(self.reduce_chan_level3(dec3))
        dec2 = torch.cat([self.up3_2(dec3), self._prompted(2, enc2, weights)], dim=1)
        dec2 = self.decoder_level2(self.reduce_chan_level2(dec2))
        dec1 = torch.cat([self.up2_1(dec2), self._prompted(1, enc1, weights)], dim=1)
        image = self.output(self.refinement(self.decoder_level1(dec1))) + x

        ortho = sum(orthogonality(pip.task_prompts()) for pip in self.pip_modules())
        return Restoration(image, logits, {"orthogonality": ortho})
