"""AM-PromptIR-style restoration: a frozen CLIP tells which degradation it sees, and that weights
the prompts injected into a restoration U-Net.

    x --resize, normalise--> CLIP image tower (frozen) --> e, plus a small trainable adapter
    cos(e, text embedding of "a photo with {degradation}") / temperature --> logits --> w_clip
    at each decoder level:  w = f * w_clip + (1 - f) * softmax(Linear(GAP(features)))
        prompt = sum_t w_t P_t  (P learned, (1, T, C, S, S)) --> resized, fused into the features

The backbone is PromptIR's (``blocks.UNet`` of Restormer blocks, prompts before each upsampling),
so the two models differ only in how the prompt weights are chosen.

The CLIP text tower runs once, at build time, on one sentence per task; its output is kept as a
buffer and the tower itself is dropped, so checkpoints carry only what forward uses.
The CLIP helpers here (``create_clip``, ``FrozenImageTower``) are shared with ``perceiver``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allinone.models.base import DEFAULT_TASKS, Restoration, RestorationModel, register_model
from allinone.models.blocks import (
    TransformerBlock,
    UNet,
    conv1x1,
    conv3x3,
    restormer_blocks,
)
from allinone.models.restormer import RESTORMER_PAPER, RESTORMER_TINY
from allinone.models.weights import load_state_file

# ---------------------------------------------------------------------------------------------
# CLIP: our own small config, building, freezing, text embeddings
# ---------------------------------------------------------------------------------------------

TINY_CLIP = "allinone-tiny-clip"

# open_clip model configs of our own; open_clip's built-in ones (e.g. "ViT-B-32") need no entry.
# The vocabulary stays at CLIP's 49408 BPE tokens so open_clip's bundled tokenizer fits it.
CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    TINY_CLIP: {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "layers": 2},
    }
}

# What a CLIP text tower should read for our short task ids; other task names are read as written.
DEGRADATION_PHRASES: dict[str, str] = {
    "sr": "low resolution",
    "deblur": "blur",
    "denoise": "noise",
    "jpeg": "jpeg compression artifacts",
    "derain": "rain streaks",
    "dehaze": "haze",
    "lowlight": "low light",
}


def _register_clip_configs() -> None:
    """Make our configs known to open_clip through its own mechanism: a JSON file per config.

    The files live in one fixed temp folder, rewritten atomically, so concurrent processes agree
    and repeated runs leave nothing behind but that folder.
    """
    missing = {n: c for n, c in CLIP_CONFIGS.items() if n not in open_clip.list_models()}
    if not missing:
        return
    folder = Path(tempfile.gettempdir()) / "allinone-open-clip-configs"
    folder.mkdir(exist_ok=True)
    for name, config in missing.items():
        path = folder / f"{name}.json"
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(config))
        os.replace(partial, path)
        open_clip.add_model_config(path)


def create_clip(model_name: str, pretrained: str | None = None) -> nn.Module:
    """An open_clip CLIP model, random init, then loaded from a local state dict if given."""
    _register_clip_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown CLIP model {model_name!r}: use one of open_clip's built-in configs "
            f"(e.g. 'ViT-B-32') or {sorted(CLIP_CONFIGS)}"
        )
    # No `pretrained` here: open_clip would treat an unknown string as a tag to download.
    clip = open_clip.create_model(model_name)
    if pretrained is not None:
        load_state_file(clip, pretrained, f"CLIP {model_name}")
    return clip.eval()


def task_sentences(task_names: tuple[str, ...], template: str) -> list[str]:
    phrases = [DEGRADATION_PHRASES.get(n, n.replace("_", " ")) for n in task_names]
    return [template.format(phrase) for phrase in phrases]


@torch.no_grad()
def embed_texts(clip: nn.Module, model_name: str, sentences: list[str]) -> Tensor:
    """Unit-norm text embeddings (len(sentences), D) from the CLIP text tower."""
    tokenizer = open_clip.get_tokenizer(model_name)
    return clip.encode_text(tokenizer(sentences), normalize=True)


class FrozenImageTower(nn.Module):
    """CLIP's image tower as a fixed feature extractor: [0, 1] images of any size -> (N, D).

    It never trains: no parameter wants a gradient and it stays in eval mode whatever mode its
    parent is put in, so a pretrained tower keeps exactly the behaviour it was trained with.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = clip.visual.requires_grad_(False).eval()
        config = self.visual.preprocess_cfg
        self.image_size = tuple(self.visual.image_size)
        self.embed_dim: int = self.visual.output_dim
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), False)

    def train(self, mode: bool = True) -> FrozenImageTower:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        # The whole image, squashed to CLIP's square input: a centre crop could cut the rain off.
        x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True)
        return self.visual((x - self.mean) / self.std)


# ---------------------------------------------------------------------------------------------
# Prompts weighted by CLIP and by the features
# ---------------------------------------------------------------------------------------------


def mix_prompt_weights(clip_weights: Tensor, feature_weights: Tensor, fusion: float) -> Tensor:
    """w = f * w_clip + (1 - f) * w_feat: both are distributions over tasks, and so is w."""
    return fusion * clip_weights + (1.0 - fusion) * feature_weights


class ClipPromptBlock(nn.Module):
    """One decoder level's prompts: one learned (C, S, S) map per task, mixed per image by CLIP's
    and the features' weights, resized to the features and fused as PromptIR does (concatenate,
    transformer block, 1x1 conv back)."""

    def __init__(
        self,
        channels: int,
        num_tasks: int,
        prompt_dim: int,
        prompt_size: int,
        fusion_weight: float,
        heads: int,
        ffn_expansion_factor: float,
    ) -> None:
        super().__init__()
        self.fusion_weight = fusion_weight
        # Uniform [0, 1) init as in PromptIR: every component starts positive and comparable.
        self.prompt = nn.Parameter(torch.rand(1, num_tasks, prompt_dim, prompt_size, prompt_size))
        self.to_logits = nn.Linear(channels, num_tasks)
        self.refine = conv3x3(prompt_dim, prompt_dim)
        self.interact = TransformerBlock(channels + prompt_dim, heads, ffn_expansion_factor)
        self.reduce = conv1x1(channels + prompt_dim, channels)

    def weights(self, x: Tensor, clip_weights: Tensor) -> Tensor:
        feature_weights = self.to_logits(x.mean(dim=(2, 3))).softmax(dim=-1)
        return mix_prompt_weights(clip_weights, feature_weights, self.fusion_weight)

    def forward(self, x: Tensor, clip_weights: Tensor) -> Tensor:
        w = self.weights(x, clip_weights)
        prompt = (w[:, :, None, None, None] * self.prompt).sum(dim=1)
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.reduce(self.interact(torch.cat([x, self.refine(prompt)], dim=1)))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@register_model(
    "clip_prompt",
    presets={
        "tiny": {
            **RESTORMER_TINY,
            "clip_model": TINY_CLIP,
            "prompt_dims": [16, 32, 64],
            "prompt_sizes": [16, 8, 4],
        },
        # PromptIR's backbone and prompt sizes with the CLIP ViT-B/32 that weights the prompts.
        "paper": {
            **RESTORMER_PAPER,
            "clip_model": "ViT-B-32",
            "prompt_dims": [64, 128, 320],
            "prompt_sizes": [64, 32, 16],
        },
    },
    description="AM-PromptIR-style: frozen CLIP similarities to degradation texts weight prompts",
)
class ClipPrompt(RestorationModel):
    """PromptIR's Restormer U-Net whose three decoder levels take CLIP-weighted prompts.

    ``prompt_dims``/``prompt_sizes`` give the prompts of decoder levels 1, 2, 3 (3: the latent).
    ``fusion_weight`` = 1 trusts CLIP alone, 0 the features alone (plain PromptIR weighting).
    ``pretrained_clip`` is a local open_clip state dict for ``clip_model``; nothing is downloaded
    (named as the perceiver's, so that a pipeline's ``model.pretrained`` stays our own checkpoint).
    """

    size_multiple = UNet.size_multiple

    def __init__(
        self,
        task_names: Sequence[str] = DEFAULT_TASKS,
        clip_model: str = TINY_CLIP,
        pretrained_clip: str | None = None,
        prompt_template: str = "a photo with {}",
        temperature: float = 0.07,
        fusion_weight: float = 0.5,
        dim: int = 16,
        num_blocks: Sequence[int] = (1, 1, 1, 2),
        num_refinement_blocks: int = 1,
        heads: Sequence[int] = (1, 1, 2, 2),
        ffn_expansion_factor: float = 2.0,
        prompt_dims: Sequence[int] = (16, 32, 64),
        prompt_sizes: Sequence[int] = (16, 8, 4),
    ) -> None:
        super().__init__(tuple(task_names))
        if len(prompt_dims) != 3 or len(prompt_sizes) != 3:
            raise ValueError(
                f"prompt_dims and prompt_sizes need one value per decoder level (3), "
                f"got {list(prompt_dims)} and {list(prompt_sizes)}"
            )
        if not 0.0 <= fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight must lie in [0, 1], got {fusion_weight}")
        self.temperature = temperature
        self._build_clip(clip_model, pretrained_clip, prompt_template)
        self.unet = UNet(
            dim, num_blocks, num_refinement_blocks, restormer_blocks(heads, ffn_expansion_factor)
        )
        self.prompt_blocks = nn.ModuleDict(
            {
                str(level): ClipPromptBlock(
                    self.unet.decoder_channels(level),
                    self.num_tasks,
                    prompt_dims[level - 1],
                    prompt_sizes[level - 1],
                    fusion_weight,
                    heads[2],  # as PromptIR: the level-3 head count for every prompt block
                    ffn_expansion_factor,
                )
                for level in (1, 2, 3)
            }
        )

    def _build_clip(self, model_name: str, pretrained: str | None, template: str) -> None:
        clip = create_clip(model_name, pretrained)
        sentences = task_sentences(self.task_names, template)
        self.register_buffer("text_embeddings", embed_texts(clip, model_name, sentences))
        self.clip = FrozenImageTower(clip)  # the text tower is dropped here: its work is done
        embed = self.clip.embed_dim
        # CLIP stays frozen; this small residual adapter is what the focal loss can sharpen.
        # Zero-initialised, so training starts from CLIP's own similarities.
        self.clip_adapter = nn.Sequential(
            nn.Linear(embed, embed), nn.GELU(), nn.Linear(embed, embed)
        )
        nn.init.zeros_(self.clip_adapter[-1].weight)
        nn.init.zeros_(self.clip_adapter[-1].bias)

    def degradation_logits(self, x: Tensor) -> Tensor:
        """Cosine similarity of the image to each task's text, over the temperature: (N, T)."""
        image = self.clip(x)
        image = F.normalize(image + self.clip_adapter(image), dim=-1)
        return image @ self.text_embeddings.t() / self.temperature

    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        # Blind, like AM-PromptIR: the prompts follow what CLIP sees, never the task label.
        logits = self.degradation_logits(x)
        clip_weights = logits.softmax(dim=-1)

        def prompt(level: int, h: Tensor) -> Tensor:
            return self.prompt_blocks[str(level)](h, clip_weights)

        residual = self.unet.decode(self.unet.encode(x), before_up=prompt)
        return Restoration(image=x + residual, logits=logits)
