"""MPerceiver (``perceiver``): a latent diffusion restorer on diffusers' Stable Diffusion classes.

Tiny presets only, on small crops; the paper preset is built on the meta device and compared with
Stable Diffusion 2.1-base's published configs. Every "pretrained" folder is one the test saves.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

from allinone import models
from allinone.evaluate.metrics import restore_tiled
from allinone.models import _StayOnMeta
from allinone.models.clip_prompt import TINY_CLIP, create_clip
from allinone.models.perceiver import STAGE_PARAMETERS, Perceiver
from allinone.models.perceiver.loading import open_clip_from_transformers

SHAPE = (2, 3, 32, 32)
TASKS = torch.tensor([0, 2])


def build(init_seed: int = 0, **overrides) -> Perceiver:
    torch.manual_seed(init_seed)
    model = models.build("perceiver", "tiny", **overrides)
    model.configure_sampling(steps=2)
    return model


def state_equal(a: nn.Module | dict, b: nn.Module | dict) -> bool:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def in_stage(name: str, stage: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in STAGE_PARAMETERS[stage])


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(123)
    gt = torch.rand(SHAPE)
    return (gt + 0.1 * torch.randn(SHAPE)).clamp(0, 1), gt


# -- the training objective -------------------------------------------------------------------


def test_training_loss_is_the_noise_prediction_loss(images) -> None:
    lq, gt = images
    model = build().train()
    model.seed_training(5)
    out = model(lq, TASKS, with_aux=True, target=gt)
    assert out.image is None and set(out.aux) == {"noise"}
    assert out.logits.shape == (2, model.num_tasks)
    model.seed_training(5)
    predicted, noise, _ = model.noise_prediction(lq, gt, model.training_generator)
    assert predicted.shape == noise.shape == (2, 4, 4, 4)  # latents at 1/8, as SD's
    assert torch.allclose(out.aux["noise"], ((predicted - noise) ** 2).mean())


def test_training_loss_does_not_depend_on_the_sampler(images) -> None:
    lq, gt = images
    model = build().train()
    losses = []
    for steps, seed in ((1, 0), (7, 99)):
        model.configure_sampling(steps=steps, seed=seed)
        model.seed_training(3)
        losses.append(model(lq, TASKS, with_aux=True, target=gt).aux["noise"])
    assert torch.equal(losses[0], losses[1])
    model.seed_training(4)  # another training seed draws other timesteps and noise
    assert not torch.equal(losses[0], model(lq, TASKS, with_aux=True, target=gt).aux["noise"])


@pytest.mark.parametrize("stage", ["predictor", "diffusion", "refinement"])
def test_each_stage_trains_only_its_own_parameters(images, stage: str) -> None:
    lq, gt = images
    model = build(trains=stage, refinement_sample_steps=1).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(in_stage(n, stage) for n in trainable)
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for n, p in model.named_parameters() if n in trainable
    }
    out = model(lq, TASKS, with_aux=True, target=gt)
    if stage == "refinement":  # an image: the pipeline's pixel loss trains the fusion layers
        assert out.image.shape == gt.shape
        loss = (out.image - gt).abs().mean()
    else:
        loss = sum(out.aux.values())
    loss.backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == trainable, sorted(graded ^ trainable)[:5]
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())


def test_stage_switches_and_frozen_towers_stay_in_eval_mode() -> None:
    model = build()
    assert model.training_stage == "diffusion"
    model.set_training_stage("predictor")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "classifier.fc1.weight",
        "classifier.fc1.bias",
        "classifier.fc2.weight",
        "classifier.fc2.bias",
    }
    with pytest.raises(ValueError, match="unknown training stage 'decoder'"):
        model.set_training_stage("decoder")
    model.train()
    frozen = (model.vae, model.unet, model.cond_stage_model, model.classifier.model)
    assert model.structcond_stage_model.training
    assert not any(m.training for part in frozen for m in part.modules())


def test_the_predictor_trains_with_cross_entropy_on_task_ids(images) -> None:
    lq, gt = images
    model = build(trains="predictor").train()
    out = model(lq, TASKS, with_aux=True, target=gt)
    assert out.image is None and set(out.aux) == {"ce"}
    assert torch.allclose(out.aux["ce"], nn.functional.cross_entropy(out.logits, TASKS))
    assert model.default_aux_weights == {"focal": 0.0}  # the platform's focal term stays off
    with pytest.raises(ValueError, match="task ids"):
        model(lq, None, with_aux=True, target=gt)


# -- sampling -----------------------------------------------------------------------------------


def test_ddim_is_deterministic_per_seed(images) -> None:
    lq, _ = images
    model = build().eval()
    first, again = model(lq), model(lq)
    assert torch.equal(first, again)
    model.configure_sampling(seed=7)
    other = model(lq)
    assert not torch.equal(first, other)
    assert torch.equal(other, build(seed=7).eval()(lq)), "the seed is also a constructor argument"


def test_more_sampling_steps_change_the_result(images) -> None:
    lq, _ = images
    model = build().eval()
    model.configure_sampling(steps=1)
    one = model(lq)
    model.configure_sampling(steps=4)
    assert model.sample_steps == 4 and not torch.equal(one, model(lq))
    with pytest.raises(ValueError, match="at least 1"):
        model.configure_sampling(steps=0)


def test_any_size_restores_to_the_input_size() -> None:
    model = build().eval()
    assert model.size_multiple == 16  # tiny VAE (1/8) x tiny UNet (1/2)
    x = torch.rand(1, 3, 29, 43)
    out = model(x, with_aux=True)
    assert out.image.shape == x.shape and out.logits.shape == (1, model.num_tasks)
    assert out.image.min() >= 0 and out.image.max() <= 1


def test_tiled_sampling_keeps_size_seed_and_the_single_tile_corners() -> None:
    model = build().eval()
    x = torch.rand(1, 3, 40, 72)
    tiled = restore_tiled(model, x, tile=32, overlap=16)
    assert tiled.shape == x.shape and torch.equal(tiled, restore_tiled(model, x, 32, 16))
    # A corner only its own tile covers is that tile's restoration, sampled from the same seed.
    corner = model(x[..., :32, :32])[..., :8, :8]
    torch.testing.assert_close(tiled[..., :8, :8], corner, rtol=0, atol=1e-6)


def test_refinement_decoder_is_used_once_trained(images) -> None:
    lq, gt = images
    model = build(refinement_sample_steps=1).eval()
    assert not model.refined
    before = model(lq)
    with torch.no_grad():
        plain = model.decode(torch.randn(1, 4, 4, 4), None)
    assert plain.shape == (1, 3, 32, 32)
    model.set_training_stage("refinement")
    model(lq, TASKS, with_aux=True, target=gt)
    assert model.refined and "refined" in model.state_dict()
    assert not torch.equal(before, model(lq))
    model.fusion_w = 0.0  # weight 0: the plain VAE decoder again
    assert torch.equal(before, model(lq))


# -- the paper preset is Stable Diffusion 2.1-base --------------------------------------------

# Published configs of stabilityai/stable-diffusion-2-1-base (unet/, vae/, text_encoder/).
SD21_BASE_UNET = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "upcast_attention": False,
    "use_linear_projection": True,
}
SD21_BASE_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD21_BASE_TEXT = {  # text_encoder/config.json (CLIPTextModel): OpenCLIP-H less its last layer
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}


def as_json(value):
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def paper() -> Perceiver:
    with torch.device("meta"), _StayOnMeta():
        return models.build("perceiver", "paper")


def test_paper_preset_has_sd21_base_shapes(paper: Perceiver) -> None:
    unet, vae = as_json(dict(paper.unet.config)), as_json(dict(paper.vae.config))
    assert {k: unet[k] for k in SD21_BASE_UNET} == SD21_BASE_UNET
    assert {k: vae[k] for k in SD21_BASE_VAE} == SD21_BASE_VAE
    assert vae["scaling_factor"] == 0.18215
    text = paper.cond_stage_model.model
    block = text.transformer.resblocks[0]
    assert {
        "hidden_size": text.width,
        "intermediate_size": block.mlp.c_fc.out_features,
        "num_attention_heads": text.heads,
        "num_hidden_layers": len(text.transformer.resblocks),
        "max_position_embeddings": text.context_length,
        "vocab_size": text.vocab_size,
    } == SD21_BASE_TEXT
    count = models.count_parameters
    # SD 2.1-base's own component sizes.
    assert (count(paper.unet), count(paper.vae), count(text)) == (
        865_910_724,
        83_653_863,
        340_387_840,
    )
    assert paper.tp.shape == (9, 16, 1024) and paper.num_tasks == 9
    assert paper.size_multiple == 64 and paper.min_size == 512
    assert paper.sampler.config.steps_offset == 1 and paper.sample_steps == 50


def test_paper_preset_counts_the_official_network(paper: Perceiver) -> None:
    entry = models.get_entry("perceiver")
    total, trainable = models.parameter_counts("perceiver", "paper")
    assert total == entry.official.parameters == models.count_parameters(paper)
    # MPerceiver's trainable parts in its diffusion stage: prompts, CM_Inv, IR adapter, SPADE.
    assert trainable == 168_146_432


# -- pretrained parts from local folders ------------------------------------------------------


def transformers_text_state(tower: nn.Module) -> dict[str, torch.Tensor]:
    """Our open_clip text tower's weights under transformers' CLIPTextModel names (the layout of
    a Stable Diffusion folder's text_encoder/)."""
    state, out = tower.state_dict(), {}
    out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
    out["text_model.final_layer_norm.weight"] = state["ln_final.weight"]
    out["text_model.final_layer_norm.bias"] = state["ln_final.bias"]
    names = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    for i in range(len(tower.transformer.resblocks)):
        oc, hf = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for p, t in zip("qkv", state[f"{oc}attn.in_proj_{kind}"].chunk(3), strict=True):
                out[f"{hf}self_attn.{p}_proj.{kind}"] = t
            for ours, theirs in names.items():
                out[f"{hf}{theirs}.{kind}"] = state[f"{oc}{ours}.{kind}"]
    return out


def save_sd_folder(model: Perceiver, folder) -> None:
    model.vae.save_pretrained(folder / "vae")
    model.unet.save_pretrained(folder / "unet")
    text = model.cond_stage_model.model
    (folder / "text_encoder").mkdir(parents=True)
    config = {
        "architectures": ["CLIPTextModel"],
        "hidden_size": text.width,
        "intermediate_size": text.transformer.resblocks[0].mlp.c_fc.out_features,
        "num_attention_heads": text.heads,
        "num_hidden_layers": len(text.transformer.resblocks),
        "max_position_embeddings": text.context_length,
        "vocab_size": text.vocab_size,
    }
    (folder / "text_encoder" / "config.json").write_text(json.dumps(config))
    weights = {k: v.contiguous() for k, v in transformers_text_state(text).items()}
    save_file(weights, folder / "text_encoder" / "model.safetensors")


def test_a_stable_diffusion_folder_loads_exactly(tmp_path) -> None:
    source = build(init_seed=1)
    save_sd_folder(source, tmp_path / "sd")
    loaded = build(init_seed=2, pretrained_sd=str(tmp_path / "sd"))
    assert isinstance(loaded.vae, AutoencoderKL) and isinstance(loaded.unet, UNet2DConditionModel)
    for part in ("vae", "unet", "cond_stage_model"):
        assert state_equal(getattr(loaded, part), getattr(source, part)), part
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert loaded.pretrained_sources() == {
        "vae": str(tmp_path / "sd" / "vae"),
        "unet": str(tmp_path / "sd" / "unet"),
        "cond_stage_model.model": str(tmp_path / "sd" / "text_encoder"),
    }
    # A training checkpoint keeps only what the folder does not supply, and restores exactly.
    state = loaded.training_state_dict()
    assert not any(k.startswith(("vae.", "unet.", "cond_stage_model.model.")) for k in state)
    assert "tp" in state and any(k.startswith("spade.") for k in state)
    again = build(init_seed=3, pretrained_sd=str(tmp_path / "sd"))
    again.load_training_state_dict(state)
    assert state_equal(again, loaded)
    with pytest.raises(ValueError, match="missing"):
        build(init_seed=3).load_training_state_dict(state)


def test_components_load_one_by_one_and_open_clip_files(tmp_path) -> None:
    source = build(init_seed=1)
    source.unet.save_pretrained(tmp_path / "unet")
    torch.manual_seed(9)
    clip = create_clip(TINY_CLIP)  # a whole open_clip CLIP: both towers, two text layers
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    torch.save(source.classifier.state_dict(), tmp_path / "9class_classifier.pth")
    loaded = build(
        seed=2,
        pretrained_unet=str(tmp_path / "unet"),
        pretrained_text_encoder=str(tmp_path / "clip.pt"),
        pretrained_clip=str(tmp_path / "clip.pt"),
    )
    assert state_equal(loaded.unet, source.unet)
    assert not state_equal(loaded.vae, source.vae)  # built from its config
    text = loaded.cond_stage_model.model.state_dict()
    # The penultimate layer's tower: the file's last layer, projection and scale are dropped.
    assert len(loaded.cond_stage_model.model.transformer.resblocks) == 1
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in text.items())
    assert state_equal(loaded.classifier.model, clip.visual)
    predictor = build(init_seed=2, pretrained_predictor=str(tmp_path / "9class_classifier.pth"))
    assert state_equal(predictor.classifier, source.classifier)


def test_transformers_text_names_convert_to_open_clip() -> None:
    tower = build().cond_stage_model.model
    assert state_equal(open_clip_from_transformers(transformers_text_state(tower)), tower)


def test_folders_that_do_not_match_are_named_in_one_line(tmp_path) -> None:
    source = build()
    source.unet.save_pretrained(tmp_path / "unet")
    source.vae.save_pretrained(tmp_path / "vae")

    def error(**kwargs) -> str:
        with pytest.raises((ValueError, FileNotFoundError)) as caught:
            build(**kwargs)
        message = str(caught.value)
        assert "\n" not in message
        return message

    assert "nowhere" in error(pretrained_vae=str(tmp_path / "nowhere"))
    assert "UNet2DConditionModel, not a AutoencoderKL" in error(
        pretrained_vae=str(tmp_path / "unet")
    )
    assert "vae has no vae/config.json" in error(pretrained_sd=str(tmp_path / "vae"))
    config_file = tmp_path / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config["block_out_channels"] = [32, 64, 64, 128]  # the weights of a narrower VAE
    config_file.write_text(json.dumps(config))
    assert str(tmp_path / "vae") in error(pretrained_vae=str(tmp_path / "vae"))
    save_sd_folder(build(init_seed=1), tmp_path / "sd")
    text_config = tmp_path / "sd" / "text_encoder" / "config.json"
    text_config.write_text(
        text_config.read_text().replace('"hidden_size": 64', '"hidden_size": 96')
    )
    assert "hidden_size 96 vs 64" in error(pretrained_sd=str(tmp_path / "sd"))
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "other.pt")
    assert "other.pt" in error(pretrained_text_encoder=str(tmp_path / "other.pt"))
