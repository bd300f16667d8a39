"""MPerceiver (Ai et al., CVPR 2024; hhb072/MPerceiver-Code, built on StableSR): all-in-one
restoration as latent diffusion on Stable Diffusion 2.1-base, steered by multimodal prompts.

    LQ --classifier (frozen CLIP-H image tower + head)--> image embedding e, degradation logits
    e --CM_Inv--> visual tokens per degradation j; tp[j]: learned textual tokens
    (tp[j], visual_j) --frozen OpenCLIP-H text tower--> context_j;  context = sum_j p_j context_j
    LQ --VAE encoder--> z_lq (+ encoder features per level)
    z_lq, t, logits --IR adapter--> one condition map per UNet scale
    z_t --UNet (frozen; SPADE after every ResBlock's residual branch)--> predicted noise
    train: ||noise - UNet(noisy z_gt, t)||^2   sample: DDIM from noise to the restored latent
    latent --VAE decoder, encoder features fused in at its middle levels (StableSR's CFW)--> image

Three training stages, each training only its own parameters (``trains``, the argument a
pipeline's ``curriculum.components`` set for a stage of their own; ``set_training_stage``):
``predictor`` (the classifier head; cross-entropy), ``diffusion`` (prompts, IR adapter, SPADE;
noise prediction) and ``refinement`` (the decoder's fusion layers; the pipeline's pixel loss on
latents sampled from the diffusion model, as StableSR trains its CFW).

How our code stands to the official one:
- The VAE, UNet and schedulers are diffusers' classes. The official UNet carries SPADE inside its
  ResBlocks (``h = spade(out_layers(h), cond)`` before the skip sum); diffusers' ResnetBlock2D ends
  its residual branch with ``conv2``, so a forward hook on each ``conv2`` applies the same SPADE at
  the same place, and the UNet keeps diffusers' keys (a pretrained SD folder loads unchanged).
  ``spade.i`` is the i-th ResBlock in forward order (official ``input_blocks``, ``middle_block``,
  ``output_blocks``). These are not diffusers' additive ``down_block_additional_residuals``:
  those add to the skips (ControlNet); MPerceiver modulates every block, and we keep that.
- The refinement decoder of the paper is not in the released code (its sampling script loads it
  from a config that is not published); StableSR's CFW (``Decoder_Mix``, fusion at every decoder
  level but the first and last) is what the code builds on and what we build; the released
  script's extra ``de_probs`` argument to it is therefore not used.
- The official CLIP text tower keeps all 24 layers and stops before the last; ours is built with
  23 (SD 2.1's text_encoder), so an open_clip checkpoint loads with its last layer dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from allinone.models.base import (
    DEFAULT_TASKS,
    Restoration,
    RestorationModel,
    pad_to_multiple,
)
from allinone.models.clip_prompt import TINY_CLIP, create_clip
from allinone.models.perceiver.adapters import (
    DegradationPredictor,
    FuseSftBlockRRDB,
    ImagePromptProjector,
    IRAdapter,
    TextPromptEncoder,
    size_key,
)
from allinone.models.perceiver.configs import (
    SD21_SCHEDULER,
    TINY_IR_ADAPTER,
    TINY_UNET,
    TINY_VAE,
)
from allinone.models.perceiver.ldm import SPADE
from allinone.models.perceiver.loading import (
    load_diffusers_folder,
    load_text_tower,
    sd_part,
)
from allinone.models.weights import load_state_file

# What each training stage trains (qualified-name prefixes); everything else is frozen.
STAGE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "predictor": ("classifier.fc1", "classifier.fc2"),
    "diffusion": ("tp", "CM_Inv", "structcond_stage_model", "spade"),
    "refinement": ("fusion_layer",),
}


def unet_resnets(unet: UNet2DConditionModel) -> list[nn.Module]:
    """The UNet's ResBlocks in forward order (the official input, middle, output blocks')."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [resnet for block in blocks for resnet in block.resnets]


@contextmanager
def _hooked(modules: Sequence[nn.Module], hooks: Sequence) -> Iterator[None]:
    # Hooks live for one call only: between calls the diffusers modules stay plain, so they
    # pickle, save_pretrained and compare with a stock checkpoint as they are.
    handles = [m.register_forward_hook(h) for m, h in zip(modules, hooks, strict=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _modulate(
    spade: SPADE, conditions: dict, module: nn.Module, inputs: Any, out: Tensor
) -> Tensor:
    return spade(out, conditions[size_key(out)])


def _record(store: list, module: nn.Module, inputs: Any, out: Tensor) -> None:
    store.append(out)


def _fuse(
    layer: FuseSftBlockRRDB, feature: Tensor, w: float, module, inputs, out: Tensor
) -> Tensor:
    return layer(feature, out, w)


def _randn(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Noise drawn on the CPU and moved: the same seed gives the same noise on any device."""
    return torch.randn(shape, generator=generator, device="cpu").to(like)


class Perceiver(RestorationModel):
    """See the module docstring. ``vae`` / ``unet`` / ``scheduler`` are diffusers configs,
    ``clip_model`` an open_clip config name for both CLIP towers, ``ir_adapter`` the IR adapter's
    arguments. ``sample_steps`` DDIM steps from noise, ``seed`` the sampling seed (both also set by
    ``configure_sampling``); ``fusion_w`` weighs the refinement fusion once it is trained.

    Pretrained parts come from local paths only: ``pretrained_sd`` a diffusers Stable Diffusion
    folder (its ``vae/``, ``unet/``, ``text_encoder/``), or the components one by one
    (``pretrained_vae`` / ``pretrained_unet`` diffusers folders, ``pretrained_text_encoder`` a
    ``text_encoder/`` folder or an open_clip checkpoint, which override the SD folder's),
    ``pretrained_clip`` an open_clip checkpoint for the image tower, ``pretrained_predictor`` a
    trained predictor (the official ``9class_classifier.pth`` layout: ``model.*``, ``fc1``,
    ``fc2``).
    """

    # The platform's focal loss on the logits stays off: the predictor trains with the official
    # cross-entropy (its own stage), and later stages' logits come from the frozen predictor.
    default_aux_weights = {"focal": 0.0}

    def __init__(
        self,
        task_names: Sequence[str] = DEFAULT_TASKS,
        clip_model: str = TINY_CLIP,
        vae: dict[str, Any] | None = None,
        unet: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        ir_adapter: dict[str, Any] | None = None,
        text_layers: int | None = None,
        text_prompt_tokens: int = 16,
        image_prompt_tokens: int = 16,
        predictor_hidden: int = 512,
        fuse_blocks: int = 2,
        fuse_grow_channels: int = 32,
        sample_steps: int = 50,
        seed: int = 42,
        fusion_w: float = 1.0,
        refinement_sample_steps: int | None = None,
        min_size: int = 0,
        trains: str = "diffusion",
        pretrained_sd: str | None = None,
        pretrained_vae: str | None = None,
        pretrained_unet: str | None = None,
        pretrained_text_encoder: str | None = None,
        pretrained_clip: str | None = None,
        pretrained_predictor: str | None = None,
    ) -> None:
        super().__init__(tuple(task_names))
        self._pretrained: dict[str, str] = {}
        self._build_diffusion(vae, unet, scheduler, pretrained_sd, pretrained_vae, pretrained_unet)
        self._build_prompts(
            clip_model,
            text_layers,
            text_prompt_tokens,
            image_prompt_tokens,
            predictor_hidden,
            pretrained_sd,
            pretrained_text_encoder,
            pretrained_clip,
            pretrained_predictor,
        )
        self._build_adapters(ir_adapter or TINY_IR_ADAPTER, fuse_blocks, fuse_grow_channels)
        self.size_multiple = 2 ** (
            len(self.vae.config.block_out_channels) + len(self.unet.config.block_out_channels) - 2
        )
        self.min_size = min_size
        self.fusion_w = fusion_w
        self.refinement_sample_steps = refinement_sample_steps
        self.configure_sampling(steps=sample_steps, seed=seed)
        self.training_generator: torch.Generator | None = None
        self.set_training_stage(trains)

    # -- building -----------------------------------------------------------------------------

    def _build_diffusion(self, vae, unet, scheduler, sd, vae_path, unet_path) -> None:
        self.vae = self._component(AutoencoderKL, "vae", vae or TINY_VAE, vae_path, sd)
        self.unet = self._component(UNet2DConditionModel, "unet", unet or TINY_UNET, unet_path, sd)
        latent = self.vae.config.latent_channels
        if not latent == self.unet.config.in_channels == self.unet.config.out_channels:
            raise ValueError(
                f"the VAE's {latent} latent channels must be the UNet's in/out channels "
                f"({self.unet.config.in_channels}/{self.unet.config.out_channels})"
            )
        # Schedules are numbers, not weights: kept on the CPU even when the model is built on meta.
        with torch.device("cpu"):
            self.noise_scheduler = DDPMScheduler.from_config(scheduler or SD21_SCHEDULER)
            self.sampler = DDIMScheduler.from_config(scheduler or SD21_SCHEDULER)

    def _component(self, cls, name: str, config: dict, path: str | None, sd: str | None):
        path = path or (str(sd_part(sd, name)) if sd else None)
        if path is None:
            return cls(**config)
        self._pretrained[name] = path
        return load_diffusers_folder(cls, path, name.upper() if name == "vae" else name.title())

    def _build_prompts(
        self,
        clip_model,
        text_layers,
        text_tokens,
        image_tokens,
        hidden,
        sd,
        text_path,
        clip_path,
        predictor_path,
    ) -> None:
        self.classifier = DegradationPredictor(
            create_clip(clip_model, clip_path), self.num_tasks, hidden
        )
        if clip_path:
            self._pretrained["classifier.model"] = clip_path
        if predictor_path:
            load_state_file(self.classifier, predictor_path, "degradation predictor")
            self._pretrained["classifier"] = predictor_path
        text_cfg = open_clip.CLIPTextCfg(**open_clip.get_model_config(clip_model)["text_cfg"])
        layers = text_cfg.layers - 1 if text_layers is None else text_layers  # penultimate
        self.cond_stage_model = TextPromptEncoder(
            text_cfg, layers, open_clip.get_tokenizer(clip_model), text_tokens, image_tokens
        )
        width = self.cond_stage_model.width
        if width != self.unet.config.cross_attention_dim:
            raise ValueError(
                f"the text tower's width {width} must be the UNet's cross_attention_dim "
                f"{self.unet.config.cross_attention_dim}"
            )
        text_path = text_path or (str(sd_part(sd, "text_encoder")) if sd else None)
        if text_path:
            load_text_tower(self.cond_stage_model.model, text_path, "text encoder")
            self._pretrained["cond_stage_model.model"] = text_path
        self.CM_Inv = ImagePromptProjector(
            self.classifier.embed_dim, width, image_tokens, self.num_tasks
        )
        self.tp = nn.Parameter(0.02 * torch.randn(self.num_tasks, text_tokens, width))

    def _build_adapters(self, ir_adapter: dict, fuse_blocks: int, fuse_grow: int) -> None:
        self.structcond_stage_model = IRAdapter(
            self.vae.config.latent_channels, **ir_adapter, num_classes=self.num_tasks
        )
        unet_levels = len(self.unet.config.block_out_channels)
        if self.structcond_stage_model.num_levels != unet_levels:
            raise ValueError(
                f"the IR adapter has {self.structcond_stage_model.num_levels} levels "
                f"(channel_mult), the UNet {unet_levels}: it conditions every UNet scale"
            )
        label = ir_adapter["out_channels"]
        self.spade = nn.ModuleList(SPADE(r.out_channels, label) for r in unet_resnets(self.unet))
        channels = self.vae.config.block_out_channels
        if len(channels) < 3:
            raise ValueError("the refinement decoder needs a VAE of at least 3 levels")
        # StableSR's Decoder_Mix fuses at every level but the first and the deepest.
        self.fusion_layer = nn.ModuleDict(
            {
                str(level): FuseSftBlockRRDB(channels[level], fuse_blocks, fuse_grow)
                for level in range(1, len(channels) - 1)
            }
        )
        self.register_buffer("refined", torch.zeros((), dtype=torch.bool))

    # -- what trains, what is pretrained ------------------------------------------------------

    def set_training_stage(self, stage: str) -> None:
        """Make only ``stage``'s parameters trainable (requires_grad), everything else frozen."""
        if stage not in STAGE_PARAMETERS:
            raise ValueError(
                f"unknown training stage {stage!r} (stages: {', '.join(STAGE_PARAMETERS)})"
            )
        self.training_stage = stage
        prefixes = STAGE_PARAMETERS[stage]
        for name, p in self.named_parameters():
            p.requires_grad_(any(name == q or name.startswith(q + ".") for q in prefixes))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def prompt_parameters(self) -> Iterator[nn.Parameter]:
        ir = self.structcond_stage_model
        yield self.tp
        yield ir.visual_prompt
        for module in (self.CM_Inv, ir.prompt_attns, ir.norm1, ir.norm2):
            yield from module.parameters()

    def pretrained_sources(self) -> dict[str, str]:
        """Qualified-name prefix -> the local path its weights were loaded from."""
        return dict(self._pretrained)

    def train(self, mode: bool = True) -> Perceiver:
        super().train(mode)
        for frozen in (self.vae, self.unet, self.classifier.model):
            frozen.eval()  # frozen means frozen, dropout and all
        return self

    # -- seeds and sampling options -----------------------------------------------------------

    def seed_training(self, seed: int) -> None:
        """Draw training timesteps and noise from a generator seeded here (the worker's seed;
        unseeded, they come from torch's global generator)."""
        self.training_generator = torch.Generator(device="cpu").manual_seed(seed)

    def configure_sampling(self, steps: int | None = None, seed: int | None = None) -> None:
        """DDIM steps and sampling seed for restoration; ``None`` leaves a setting as it is."""
        if steps is not None:
            if steps < 1:
                raise ValueError(f"sample_steps must be at least 1, got {steps}")
            self.sample_steps = steps
        if seed is not None:
            self.seed = seed

    # -- the parts of the pipeline ------------------------------------------------------------

    def condition(self, embedding: Tensor, logits: Tensor) -> Tensor:
        """The UNet's cross-attention context: per-degradation text-tower outputs mixed by p."""
        visual = self.CM_Inv(embedding)  # (N, classes, tokens, width)
        n, k = visual.shape[:2]
        textual = self.tp.expand(n, -1, -1, -1)
        contexts = self.cond_stage_model(textual.flatten(0, 1), visual.flatten(0, 1))
        weights = logits.softmax(dim=1)[:, :, None, None]
        return (weights * contexts.unflatten(0, (n, k))).sum(dim=1)

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, list[Tensor]]:
        """A sample of the VAE posterior (scaled like SD's latents) of a [0, 1] image, and the
        encoder's feature at the end of every level (what the refinement decoder fuses)."""
        features: list[Tensor] = []
        ends = [block.resnets[-1] for block in self.vae.encoder.down_blocks]
        with _hooked(ends, [partial(_record, features)] * len(ends)):
            posterior = self.vae.encode(x * 2 - 1).latent_dist
        latent = posterior.mean + posterior.std * _randn(posterior.mean.shape, generator, x)
        return latent * self.vae.config.scaling_factor, features

    def decode(self, latent: Tensor, features: list[Tensor] | None) -> Tensor:
        """[-1, 1] image from a latent; with encoder features, through the refinement fusion."""
        latent = latent / self.vae.config.scaling_factor
        if features is None:
            return self.vae.decode(latent).sample
        up_blocks = self.vae.decoder.up_blocks
        levels = [int(level) for level in self.fusion_layer]
        ends = [up_blocks[len(up_blocks) - 1 - level].resnets[-1] for level in levels]
        hooks = [
            partial(_fuse, self.fusion_layer[str(level)], features[level], self.fusion_w)
            for level in levels
        ]
        with _hooked(ends, hooks):
            return self.vae.decode(latent).sample

    def predict_noise(
        self, latent: Tensor, t: Tensor, context: Tensor, conditions: dict[str, Tensor]
    ) -> Tensor:
        resnets = unet_resnets(self.unet)
        hooks = [partial(_modulate, spade, conditions) for spade in self.spade]
        with _hooked([r.conv2 for r in resnets], hooks):
            return self.unet(latent, t, encoder_hidden_states=context).sample

    @torch.no_grad()
    def sample(
        self, z_lq: Tensor, context: Tensor, logits: Tensor, steps: int, generator: torch.Generator
    ) -> Tensor:
        """DDIM (eta 0) from Gaussian noise to the restored latent."""
        self.sampler.set_timesteps(steps)
        latent = _randn(z_lq.shape, generator, z_lq)
        for t in self.sampler.timesteps:
            ts = torch.full((len(z_lq),), int(t), device=z_lq.device, dtype=torch.long)
            conditions = self.structcond_stage_model(z_lq, ts, logits)
            noise = self.predict_noise(latent, ts, context, conditions)
            latent = self.sampler.step(noise, int(t), latent).prev_sample
        return latent

    # -- restoration --------------------------------------------------------------------------

    @torch.no_grad()
    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        """Blind, as the paper: the degradation comes from the predictor, never the task id."""
        x = _pad_to_at_least(x, self.min_size, self.size_multiple)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        embedding, logits = self.classifier(x)
        z_lq, features = self.encode(x, generator)
        latent = self.sample(
            z_lq, self.condition(embedding, logits), logits, self.sample_steps, generator
        )
        refine = bool(self.refined) and self.fusion_w > 0
        image = self.decode(latent, features if refine else None)
        return Restoration(image=((image + 1) / 2).clamp(0, 1), logits=logits)

    # -- training -----------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        task_id: Tensor | None = None,
        with_aux: bool = False,
        target: Tensor | None = None,
    ) -> Tensor | Restoration | None:
        """Restore ``x``; with a ``target``, the training stage's objective instead."""
        if target is None:
            return super().forward(x, task_id, with_aux)
        height, width = x.shape[-2:]
        x, target = (pad_to_multiple(t, self.size_multiple) for t in (x, target))
        objective = {
            "predictor": self._predictor_objective,
            "diffusion": self._diffusion_objective,
            "refinement": self._refinement_objective,
        }[self.training_stage]
        out = objective(x, task_id, target)
        if out.image is not None:
            out = out._replace(image=out.image[..., :height, :width])
        return out if with_aux else out.image

    def _predictor_objective(
        self, x: Tensor, task_id: Tensor | None, target: Tensor
    ) -> Restoration:
        if task_id is None:
            raise ValueError("the degradation predictor's stage trains on task ids: none given")
        _, logits = self.classifier(x)
        return Restoration(image=None, logits=logits, aux={"ce": F.cross_entropy(logits, task_id)})

    def _diffusion_objective(
        self, x: Tensor, task_id: Tensor | None, target: Tensor
    ) -> Restoration:
        predicted, noise, logits = self.noise_prediction(x, target, self.training_generator)
        return Restoration(
            image=None, logits=logits, aux={"noise": F.mse_loss(predicted.float(), noise.float())}
        )

    def noise_prediction(
        self, x: Tensor, target: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(predicted noise, true noise, logits) at a uniform random timestep of the GT latent."""
        with torch.no_grad():
            embedding, logits = self.classifier(x)
            z_lq, _ = self.encode(x, generator)
            z_gt, _ = self.encode(target, generator)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (len(x),), generator=generator, device="cpu").to(x.device)
        noise = _randn(z_gt.shape, generator, z_gt)
        noisy = self.noise_scheduler.add_noise(z_gt, noise, t)
        conditions = self.structcond_stage_model(z_lq, t, logits)
        predicted = self.predict_noise(noisy, t, self.condition(embedding, logits), conditions)
        return predicted, noise, logits

    def _refinement_objective(
        self, x: Tensor, task_id: Tensor | None, target: Tensor
    ) -> Restoration:
        generator = self.training_generator
        with torch.no_grad():
            embedding, logits = self.classifier(x)
            z_lq, features = self.encode(x, generator)
            steps = self.refinement_sample_steps or self.sample_steps
            latent = self.sample(z_lq, self.condition(embedding, logits), logits, steps, generator)
        self.refined.fill_(True)
        image = (self.decode(latent, features) + 1) / 2
        return Restoration(image=image, logits=logits)


def _pad_to_at_least(x: Tensor, size: int, multiple: int) -> Tensor:
    """Reflect-pad bottom/right up to ``size`` (rounded to ``multiple``) where ``x`` is smaller."""
    target = -(-size // multiple) * multiple
    pad_h, pad_w = max(0, target - x.shape[-2]), max(0, target - x.shape[-1])
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
