"""Component configs: Stable Diffusion 2.1-base's, as published in its diffusers folder
(stabilityai/stable-diffusion-2-1-base: unet/, vae/, scheduler/ config.json; its text_encoder is
the OpenCLIP ViT-H-14 text tower less its last layer), MPerceiver's adapters as its
configs/MPerceiver/all_in_one.yaml sets them, and tiny versions of each for CPU tests.
"""

from __future__ import annotations

from typing import Any

from allinone.models.clip_prompt import TINY_CLIP

# MPerceiver's nine training degradations, in its classifier's label order
# (classification/train.py: haze, snow, Gaussian noise, rain, motion blur, defocus blur,
# real noise, raindrop, low light).
MPERCEIVER_TASKS: tuple[str, ...] = (
    "dehaze",
    "desnow",
    "denoise",
    "derain",
    "motion_deblur",
    "defocus_deblur",
    "real_denoise",
    "raindrop",
    "lowlight",
)

SD21_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
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
    "attention_head_dim": (5, 10, 20, 20),  # diffusers reads these as head counts (64-d heads)
    "use_linear_projection": True,
    "upcast_attention": False,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
# scheduler/scheduler_config.json (a PNDMScheduler there; the same betas drive our DDPM training
# schedule and DDIM sampler). MPerceiver's all_in_one.yaml: linear_start 0.00085, linear_end
# 0.012, 1000 steps, eps prediction; its DDIM steps are uniform from t = 1 ("leading", offset 1).
SD21_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
# structcond_stage_config (IRAdapter); its visual prompts are 24 tokens of 512 in the code.
MPERCEIVER_IR_ADAPTER: dict[str, Any] = {
    "model_channels": 128,
    "out_channels": 512,
    "num_res_blocks": 2,
    "attention_resolutions": (4, 2, 1),
    "channel_mult": (1, 2, 3, 4),
    "num_heads": 4,
    "prompt_tokens": 24,
    "prompt_dim": 512,
}

TINY_VAE: dict[str, Any] = {
    # Four levels as SD's: latents at 1/8 (the VAE's middle self-attention stays affordable on
    # whole test images) and refinement fusions at levels 1 and 2.
    "block_out_channels": (16, 32, 32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
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
    "cross_attention_dim": 64,  # the tiny CLIP's text width
    "attention_head_dim": 2,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
TINY_IR_ADAPTER: dict[str, Any] = {
    "model_channels": 32,
    "out_channels": 32,
    "num_res_blocks": 1,
    "attention_resolutions": (1,),
    "channel_mult": (1, 2),  # one level per UNet level
    "num_heads": 2,
    "prompt_tokens": 4,
    "prompt_dim": 32,
}

TINY: dict[str, Any] = {
    "clip_model": TINY_CLIP,
    "vae": TINY_VAE,
    "unet": TINY_UNET,
    "ir_adapter": TINY_IR_ADAPTER,
    "text_prompt_tokens": 4,
    "image_prompt_tokens": 4,
    "predictor_hidden": 32,
    "fuse_blocks": 1,
    "fuse_grow_channels": 8,
}
PAPER: dict[str, Any] = {
    "task_names": MPERCEIVER_TASKS,
    "clip_model": "ViT-H-14",  # both towers: OpenCLIP-H, laion2b_s32b_b79k in the paper
    "vae": SD21_VAE,
    "unet": SD21_UNET,
    "ir_adapter": MPERCEIVER_IR_ADAPTER,
    "text_prompt_tokens": 16,
    "image_prompt_tokens": 16,
    "predictor_hidden": 512,
    "fuse_blocks": 2,  # StableSR's Decoder_Mix default num_fuse_block
    "fuse_grow_channels": 32,
    "min_size": 512,  # ddim_sample_vae.py pads inputs below 512 up to 512
}
