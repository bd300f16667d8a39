"""MPerceiver-style restoration: a Stable-Diffusion VAE and UNet (diffusers' own classes) turned
into a one-step restorer, steered by CLIP through textual and visual prompts.

    x --frozen CLIP image tower--> e --MLP--> degradation logits (focal loss) --> task probs p
    e --cross-modal adapter--> K tokens, joined by sum_t p_t * (learned task text tokens):
        the UNet's cross-attention context
    x --VAE encoder--> latent z (+ encoder features at every scale)
         encoder features --IR adapter--> one residual per UNet skip + mid (ControlNet-style)
    z <- z + UNet(z, t fixed, context, residuals)    (repeated num_steps times)
    z --VAE decoder, with encoder features fused in at every scale--> decoded
    out = x + refine([decoded, x])                   (global residual in pixel space)

The VAE is frozen by default; the UNet, adapters, skip fusions and refinement
head train. Zero-initialised convolutions where adapters feed the VAE/UNet (ControlNet's trick)
let pretrained components start from their own behaviour.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from allinone.models.base import DEFAULT_TASKS, Restoration, RestorationModel, register_model
from allinone.models.clip_prompt import TINY_CLIP, FrozenImageTower, create_clip

# ---------------------------------------------------------------------------------------------
# Configs of the diffusers components
# ---------------------------------------------------------------------------------------------

TINY_VAE: dict[str, Any] = {
    "block_out_channels": (32, 32, 64),  # 3 levels: latents at 1/4 of the image
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 64,
}
TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,  # diffusers reads this as the number of heads
    "norm_num_groups": 16,
}
# Stable Diffusion 2.1-base geometry (512 px, latents at 1/8, OpenCLIP-H sized context).
SD21_VAE: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
SD21_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}

TINY = {"clip_model": TINY_CLIP, "vae": TINY_VAE, "unet": TINY_UNET, "refine_channels": 16}
PAPER = {"clip_model": "ViT-B-32", "vae": SD21_VAE, "unet": SD21_UNET, "refine_channels": 64}


# ---------------------------------------------------------------------------------------------
# Loading diffusers components from a local folder
# ---------------------------------------------------------------------------------------------

Component = TypeVar("Component", bound=ModelMixin)


def load_diffusers_folder(cls: type[Component], path: str | Path, what: str) -> Component:
    """``cls.from_pretrained(path)`` on a local ``save_pretrained`` folder, never the Hub.

    diffusers fills weights missing from the file with random ones and only logs it; here any
    missing, unexpected or mismatched weight is an error naming the folder.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{what} folder {path} not found or without config.json (expected a diffusers "
            f"save_pretrained folder)"
        )
    saved_class = json.loads(config_file.read_text()).get("_class_name")
    if saved_class != cls.__name__:
        raise ValueError(f"{what} folder {path} holds a {saved_class}, not a {cls.__name__}")
    try:
        # local_files_only: never the Hub. low_cpu_mem_usage=False is what diffusers falls back
        # to without `accelerate` anyway; asking for it up front spares a warning.
        model, info = cls.from_pretrained(
            path, local_files_only=True, low_cpu_mem_usage=False, output_loading_info=True
        )
    except Exception as error:
        raise ValueError(f"{what} folder {path} could not be loaded: {error}") from error
    problems = {kind: keys for kind, keys in info.items() if keys}
    if problems:
        raise ValueError(f"{what} folder {path} does not fit its config: {problems}")
    return model


def build_component(
    cls: type[Component], config: dict[str, Any], path: str | None, what: str
) -> Component:
    return cls(**config) if path is None else load_diffusers_folder(cls, path, what)


# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------


def zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 1x1 conv that starts at zero, so what it feeds starts unchanged (ControlNet's trick)."""
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class CrossModalAdapter(nn.Module):
    """CLIP image embedding -> K context tokens, plus per-task textual prompt tokens mixed by p."""

    def __init__(
        self, clip_dim: int, context_dim: int, num_tokens: int, num_tasks: int, num_task_tokens: int
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.to_tokens = nn.Sequential(
            nn.LayerNorm(clip_dim), nn.Linear(clip_dim, num_tokens * context_dim)
        )
        self.textual_prompts = nn.Parameter(
            0.02 * torch.randn(num_tasks, num_task_tokens, context_dim)
        )

    def forward(self, clip_embedding: Tensor, task_probs: Tensor) -> Tensor:
        visual = self.to_tokens(clip_embedding).unflatten(-1, (self.num_tokens, -1))
        textual = torch.einsum("nt,tkd->nkd", task_probs, self.textual_prompts)
        return torch.cat([visual, textual], dim=1)


def unet_skip_shapes(unet: UNet2DConditionModel) -> list[tuple[int, int]]:
    """(channels, level) of every skip the UNet's down path hands its up path, in order.

    Level l is 2**l times coarser than the latent. Read from the built modules, so a loaded
    checkpoint with another geometry is handled the same way.
    """
    shapes = [(unet.conv_in.out_channels, 0)]
    for level, block in enumerate(unet.down_blocks):
        shapes += [(resnet.out_channels, level) for resnet in block.resnets]
        if block.downsamplers is not None:
            shapes.append((block.downsamplers[0].out_channels, level + 1))
    return shapes


class IRAdapter(nn.Module):
    """Multi-scale visual prompts: a light conv pyramid over the VAE encoder's latent-scale
    features, read out by zero convs into one residual per UNet skip and one for its middle."""

    def __init__(self, in_channels: int, unet: UNet2DConditionModel, reduction: int) -> None:
        super().__init__()
        self.skip_levels = [level for _, level in unet_skip_shapes(unet)]
        widths = [max(8, c // reduction) for c in unet.config.block_out_channels]
        self.levels = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(
                    widths[i - 1] if i else in_channels, w, 3, stride=2 if i else 1, padding=1
                ),
                nn.SiLU(),
                nn.Conv2d(w, w, 3, padding=1),
                nn.SiLU(),
            )
            for i, w in enumerate(widths)
        )
        self.to_skips = nn.ModuleList(
            zero_conv(widths[level], c) for c, level in unet_skip_shapes(unet)
        )
        self.to_mid = zero_conv(widths[-1], unet.config.block_out_channels[-1])

    def forward(self, features: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        pyramid = []
        for level in self.levels:
            features = level(features)
            pyramid.append(features)
        skips = tuple(
            conv(pyramid[level])
            for conv, level in zip(self.to_skips, self.skip_levels, strict=True)
        )
        return skips, self.to_mid(pyramid[-1])


def refinement_head(channels: int) -> nn.Sequential:
    """[decoded, LQ] -> pixel residual, its last conv scaled down so the model starts near the
    identity (already a fair restoration) while every part still gets a gradient at step one."""
    head = nn.Sequential(
        nn.Conv2d(6, channels, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(channels, 3, 3, padding=1),
    )
    with torch.no_grad():
        head[-1].weight.mul_(0.01)
        head[-1].bias.zero_()
    return head


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@register_model(
    "perceiver",
    presets={"tiny": TINY, "paper": PAPER},
    description="MPerceiver-style: SD VAE + UNet one-step restorer with CLIP-driven prompts",
)
class Perceiver(RestorationModel):
    """``vae`` / ``unet`` are the diffusers configs to build from; ``pretrained_vae`` /
    ``pretrained_unet`` are local ``save_pretrained`` folders that replace them (config and
    weights), ``pretrained_clip`` a local open_clip state dict. ``timestep`` is the UNet's fixed
    timestep; ``num_steps`` > 1 refines the latent a few times, from ``timestep`` towards 0.
    """

    def __init__(
        self,
        task_names: Sequence[str] = DEFAULT_TASKS,
        clip_model: str = TINY_CLIP,
        vae: dict[str, Any] | None = None,
        unet: dict[str, Any] | None = None,
        num_context_tokens: int = 4,
        num_task_tokens: int = 2,
        adapter_reduction: int = 4,
        refine_channels: int = 16,
        timestep: int = 999,
        num_steps: int = 1,
        train_vae: bool = False,
        pretrained_vae: str | None = None,
        pretrained_unet: str | None = None,
        pretrained_clip: str | None = None,
    ) -> None:
        super().__init__(tuple(task_names))
        if num_steps < 1 or not 0 <= timestep < 1000:
            raise ValueError(
                f"need num_steps >= 1 and 0 <= timestep < 1000, got {num_steps}, {timestep}"
            )
        self.vae = build_component(AutoencoderKL, vae or TINY_VAE, pretrained_vae, "VAE")
        self.unet = build_component(
            UNet2DConditionModel, unet or TINY_UNET, pretrained_unet, "UNet"
        )
        self._check_latent_channels()
        self.train_vae = train_vae
        self.vae.requires_grad_(train_vae)
        vae_levels = len(self.vae.config.block_out_channels)
        unet_levels = len(self.unet.config.block_out_channels)
        self.size_multiple = 2 ** (vae_levels - 1 + unet_levels - 1)
        # A few evenly spaced steps from `timestep` down; one step is plain one-step restoration.
        self.register_buffer(
            "timesteps", torch.linspace(timestep, 0, num_steps + 1)[:-1].round().long(), False
        )

        self.clip = FrozenImageTower(create_clip(clip_model, pretrained_clip))
        embed = self.clip.embed_dim
        self.predictor = nn.Sequential(
            nn.LayerNorm(embed),
            nn.Linear(embed, embed),
            nn.GELU(),
            nn.Linear(embed, self.num_tasks),
        )
        context_dim = self.unet.config.cross_attention_dim
        self.cross_modal = CrossModalAdapter(
            embed, context_dim, num_context_tokens, self.num_tasks, num_task_tokens
        )
        vae_channels = list(self.vae.config.block_out_channels)
        self.ir_adapter = IRAdapter(vae_channels[-1], self.unet, adapter_reduction)
        self.skip_fusions = self._build_skip_fusions(vae_channels)
        self.refine = refinement_head(refine_channels)

    def _check_latent_channels(self) -> None:
        latent, unet_in = self.vae.config.latent_channels, self.unet.config.in_channels
        unet_out = self.unet.config.out_channels
        if not latent == unet_in == unet_out:
            raise ValueError(
                f"the VAE's {latent} latent channels must match the UNet's in/out channels "
                f"({unet_in}/{unet_out})"
            )

    @staticmethod
    def _build_skip_fusions(channels: list[int]) -> nn.ModuleList:
        """Detail refinement: per decoder up block, a zero conv from the encoder feature at the
        scale of the block's input (as ``encode`` keys them) to the block's input channels."""
        last = len(channels) - 1
        encoder = {0: channels[0]} | {min(i + 1, last): c for i, c in enumerate(channels)}
        # Up block j reads the mid block's output (j = 0), then up block j - 1's.
        decoder = [channels[-1], *channels[::-1][:-1]]
        return nn.ModuleList(zero_conv(encoder[last - j], c) for j, c in enumerate(decoder))

    def train(self, mode: bool = True) -> Perceiver:
        super().train(mode)
        if not self.train_vae:
            self.vae.eval()  # frozen means frozen, dropout and all
        return self

    # -- VAE with its encoder features exposed ------------------------------------------------

    def encode(self, x: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """Latent (the posterior's mode, scaled like SD) and the encoder features by scale.

        Runs the encoder's own layers one by one so that its intermediate features can feed the
        IR adapter and the decoder; ``features[s]`` is the last one at 1 / 2**s of the image.
        """
        encoder = self.vae.encoder
        with torch.set_grad_enabled(self.train_vae and torch.is_grad_enabled()):
            h = encoder.conv_in(x * 2 - 1)  # SD's VAE reads [-1, 1]
            features = {0: h}
            last = len(encoder.down_blocks) - 1
            for i, block in enumerate(encoder.down_blocks):
                h = block(h)
                features[min(i + 1, last)] = h  # every block but the last halves the size
            h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(encoder.mid_block(h))))
            if self.vae.quant_conv is not None:
                h = self.vae.quant_conv(h)
            mean = h.chunk(2, dim=1)[0]  # deterministic: restoration wants no sampling noise
        shift = self.vae.config.shift_factor or 0.0
        return (mean - shift) * self.vae.config.scaling_factor, features

    def decode(self, latent: Tensor, features: dict[int, Tensor]) -> Tensor:
        """Image in [0, 1] from a latent, the encoder's features added before every up block."""
        decoder = self.vae.decoder
        z = latent / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        h = decoder.mid_block(decoder.conv_in(z))
        levels = len(decoder.up_blocks)
        for j, (block, fuse) in enumerate(zip(decoder.up_blocks, self.skip_fusions, strict=True)):
            h = block(h + fuse(features[levels - 1 - j]))
        h = decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))
        return (h + 1) / 2

    # -- forward ------------------------------------------------------------------------------

    def task_probabilities(self, logits: Tensor, task_id: Tensor | None) -> Tensor:
        """The given task as one-hot when known (training), else the predictor's belief."""
        if task_id is None:
            return logits.softmax(dim=-1)
        return F.one_hot(task_id, self.num_tasks).to(logits.dtype)

    def latent_update(
        self, latent: Tensor, t: Tensor, context: Tensor, skips: tuple[Tensor, ...], mid: Tensor
    ) -> Tensor:
        """One UNet pass: the step from ``latent`` towards the clean latent."""
        return self.unet(
            latent,
            t,
            encoder_hidden_states=context,
            down_block_additional_residuals=skips,
            mid_block_additional_residual=mid,
        ).sample

    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        clip_embedding = self.clip(x)
        logits = self.predictor(clip_embedding)
        context = self.cross_modal(clip_embedding, self.task_probabilities(logits, task_id))
        latent, features = self.encode(x)
        skips, mid = self.ir_adapter(features[max(features)])
        for t in self.timesteps:
            latent = latent + self.latent_update(latent, t, context, skips, mid)
        decoded = self.decode(latent, features)
        image = x + self.refine(torch.cat([decoded, x], dim=1))
        return Restoration(image=image, logits=logits)
