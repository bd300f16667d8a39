"""MPerceiver: latent diffusion on Stable Diffusion 2.1-base with multimodal prompts (the model
in ``model.py``; its adapters, LDM blocks, configs and weight loading beside it)."""

from __future__ import annotations

from allinone.models.base import OfficialRelease, register_model
from allinone.models.perceiver.configs import (
    MPERCEIVER_TASKS,
    PAPER,
    SD21_SCHEDULER,
    SD21_UNET,
    SD21_VAE,
    TINY,
    TINY_UNET,
    TINY_VAE,
)
from allinone.models.perceiver.model import STAGE_PARAMETERS, Perceiver, unet_resnets

__all__ = [
    "MPERCEIVER_TASKS",
    "PAPER",
    "SD21_SCHEDULER",
    "SD21_UNET",
    "SD21_VAE",
    "STAGE_PARAMETERS",
    "TINY",
    "TINY_UNET",
    "TINY_VAE",
    "Perceiver",
    "unet_resnets",
]

register_model(
    "perceiver",
    presets={"tiny": TINY, "paper": PAPER},
    description="MPerceiver: SD 2.1 latent diffusion, CLIP-weighted multimodal prompts, DDIM",
    official=OfficialRelease(
        repository="hhb072/MPerceiver-Code",
        # Counted from the official code at all_in_one.yaml (random init): its main network
        # holds 2,104,349,877, of which 13,644,801 (the text tower's last layer, pooled projection
        # and logit scale) its forward never uses; plus StableSR's CFW fusion layers (44,393,728),
        # the refinement decoder the code builds on (the paper's own is unreleased).
        parameters=2_135_098_804,
        weights="none released (MPerceiver_Release/ckpt/README.md points to a future release)",
        unused=(
            r"cond_stage_model\.model\.transformer\.resblocks\.23\..*",
            r"cond_stage_model\.model\.(text_projection|logit_scale)",
        ),
    ),
)(Perceiver)
