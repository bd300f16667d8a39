"""PIP, Prompt-In-Prompt learning (Li et al., 2023), on a Restormer U-Net.

Two prompts per skip connection: T degradation-aware prompts (one C-vector per task: what is wrong)
and a basic restoration prompt (C x S x S: low-level content useful whatever is wrong). The image's
latent gives degradation weights; the weighted degradation-aware prompt queries the basic prompt
(prompt-to-prompt interaction) to form a universal prompt for this image. The skip features then
attend to that universal prompt, each pixel keeping only its top-m prompt positions (selective
prompt-to-feature interaction), so irrelevant prompt content cannot leak into every pixel.
An orthogonality regulariser keeps the T task prompts apart, so each can stand for one degradation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allinone.models.base import DEFAULT_TASKS, Restoration, RestorationModel, register_model
from allinone.models.blocks import (
    RESTORMER_PAPER,
    RESTORMER_TINY,
    LayerNorm2d,
    UNet,
    channel_attention,
    conv1x1,
    restormer_blocks,
)


def num_kept(num_keys: int, topm_ratio: float) -> int:
    """m = ceil(ratio * keys): how many prompt positions each pixel attends to."""
    return max(1, math.ceil(topm_ratio * num_keys))


def keep_top_m(scores: Tensor, m: int) -> Tensor:
    """``scores`` with all but each query's m largest (last dim) set to -inf.

    Masks by the indices of topk, not by a threshold, so exactly m survive even with ties.
    """
    if m >= scores.shape[-1]:
        return scores
    kept = scores.topk(m, dim=-1).indices
    return scores + torch.full_like(scores, float("-inf")).scatter(-1, kept, 0.0)


def orthogonality(prompts: Tensor) -> Tensor:
    """||P P^T - I||_F^2 of the row-normalised (T, C) prompts: 0 iff mutually orthogonal."""
    unit = F.normalize(prompts, dim=-1)
    gram = unit @ unit.T
    return (gram - torch.eye(len(unit), dtype=gram.dtype, device=gram.device)).pow(2).sum()


class PromptInPrompt(nn.Module):
    """The PIP module of one skip connection with ``channels`` feature channels."""

    def __init__(
        self, channels: int, num_tasks: int, prompt_dim: int, prompt_size: int, topm_ratio: float
    ) -> None:
        super().__init__()
        if not 0 < topm_ratio <= 1:
            raise ValueError(f"topm_ratio must be in (0, 1], got {topm_ratio}")
        self.topm_ratio = topm_ratio
        # (T, C): the paper's (1, T, C, 1, 1) without the singleton axes.
        self.task_prompts = nn.Parameter(torch.randn(num_tasks, prompt_dim))
        self.basic_prompt = nn.Parameter(torch.rand(1, prompt_dim, prompt_size, prompt_size))
        # Prompt-to-prompt: the degradation-aware prompt, laid over the basic prompt's grid, forms
        # the query; the basic prompt gives keys and values. Channel-wise attention keeps the S x S
        # layout, so the result is still a spatial prompt.
        self.p2p_query = conv1x1(prompt_dim, prompt_dim)
        self.p2p_key_value = conv1x1(prompt_dim, 2 * prompt_dim)
        self.p2p_temperature = nn.Parameter(torch.ones(1, 1, 1))
        self.p2p_project = conv1x1(prompt_dim, prompt_dim)
        # Prompt-to-feature: pixels query the universal prompt's S*S positions.
        self.norm = LayerNorm2d(channels)
        self.feature_query = conv1x1(channels, prompt_dim)
        self.prompt_key_value = conv1x1(prompt_dim, 2 * prompt_dim)
        self.project = conv1x1(prompt_dim, channels)

    def universal_prompt(self, weights: Tensor) -> Tensor:
        """(N, C, S, S) from degradation weights (N, T)."""
        aware = (weights @ self.task_prompts)[:, :, None, None]  # (N, C, 1, 1)
        # The 1x1 conv mixes channels in proportions set by the aware prompt, so the query still
        # carries it after attention normalises each channel's spatial pattern.
        q = self.p2p_query(self.basic_prompt * aware)
        k, v = self.p2p_key_value(self.basic_prompt).chunk(2, dim=1)
        mixed = channel_attention(q, k, v, 1, self.p2p_temperature)
        return self.basic_prompt + self.p2p_project(mixed)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        n, _, h, w = x.shape
        q = self.feature_query(self.norm(x)).flatten(2).transpose(1, 2)  # (N, HW, C)
        kv = self.prompt_key_value(self.universal_prompt(weights)).flatten(2).transpose(1, 2)
        k, v = kv.chunk(2, dim=-1)  # (N, S*S, C) each
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        attn = keep_top_m(scores, num_kept(k.shape[1], self.topm_ratio)).softmax(dim=-1)
        return x + self.project((attn @ v).transpose(1, 2).reshape(n, -1, h, w))


@register_model(
    "pip",
    presets={
        "tiny": {**RESTORMER_TINY, "prompt_dim": 16, "prompt_size": 8, "topm_ratio": 0.5},
        "paper": {**RESTORMER_PAPER, "prompt_dim": 64, "prompt_size": 16, "topm_ratio": 0.5},
    },
    description="PIP: degradation-aware + basic prompts, top-m prompt attention on U-Net skips",
)
class PIP(RestorationModel):
    size_multiple = UNet.size_multiple
    default_aux_weights = {"orthogonality": 0.002}  # the paper's weight on the regulariser

    def __init__(
        self,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        prompt_dim: int = 64,
        prompt_size: int = 16,
        topm_ratio: float = 0.5,
        task_names: Sequence[str] = DEFAULT_TASKS,
    ) -> None:
        super().__init__(tuple(task_names))
        self.unet = UNet(
            dim, num_blocks, num_refinement_blocks, restormer_blocks(heads, ffn_expansion_factor)
        )
        # One degradation estimate per image, read from the latent (the most global features) and
        # shared by every skip; its logits are returned so a known task can supervise them.
        self.prompt_weigh = nn.Linear(8 * dim, self.num_tasks)
        self.prompt_skips = nn.ModuleList(
            PromptInPrompt(dim * 2**level, self.num_tasks, prompt_dim, prompt_size, topm_ratio)
            for level in range(3)
        )

    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        *skips, latent = self.unet.encode(x)
        logits = self.prompt_weigh(latent.mean(dim=(-2, -1)))
        weights = logits.softmax(dim=-1)
        skips = [pip(skip, weights) for pip, skip in zip(self.prompt_skips, skips, strict=True)]
        image = x + self.unet.decode([*skips, latent])
        ortho = torch.stack([orthogonality(pip.task_prompts) for pip in self.prompt_skips]).mean()
        return Restoration(image, logits, {"orthogonality": ortho})
