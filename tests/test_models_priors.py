"""Models built on pretrained priors: CLIP-weighted prompts (clip_prompt; the Stable-Diffusion
based perceiver has tests/test_models_perceiver.py). Tiny presets only; every "pretrained" file is
one this test saves itself."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from allinone import models
from allinone.models.clip_prompt import (
    TINY_CLIP,
    FrozenImageTower,
    create_clip,
    embed_texts,
    mix_prompt_weights,
    task_sentences,
)
from allinone.models.weights import load_state_file
from allinone.train.losses import total_loss

PRIOR_MODELS = ["clip_prompt"]

# One input shape throughout: the first convolution at a new shape is slow on CPU (oneDNN builds
# its kernels), and this file should stay well under a minute on two cores.
SHAPE = (2, 3, 32, 32)


def build(name: str, seed: int = 0, **overrides) -> models.RestorationModel:
    torch.manual_seed(seed)
    return models.build(name, "tiny", **overrides)


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- CLIP stays frozen ------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRIOR_MODELS)
def test_clip_tower_is_frozen_and_stays_in_eval_mode(name: str) -> None:
    model = build(name).train()
    assert model.training
    assert isinstance(model.clip, FrozenImageTower)
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert not any(m.training for m in model.clip.modules())
    out = model(torch.rand(SHAPE), with_aux=True)
    loss, _ = total_loss(out, torch.rand(SHAPE), torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is None for p in model.clip.parameters())


def test_text_embeddings_are_a_build_time_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("clip_prompt")
    embeddings = model.text_embeddings
    assert embeddings.shape == (model.num_tasks, model.clip.embed_dim)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(model.num_tasks), atol=1e-5)
    assert "text_embeddings" in model.state_dict()
    # The text tower was dropped once it had done its work: only the image tower is kept.
    assert not any(name.startswith("clip.transformer") for name, _ in model.named_parameters())

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("forward must not tokenise")

    monkeypatch.setattr(open_clip, "get_tokenizer", no_tokenizing)
    monkeypatch.setattr(open_clip.tokenizer.SimpleTokenizer, "__call__", no_tokenizing)
    with torch.no_grad():
        assert model(torch.rand(SHAPE)).shape == SHAPE


def test_task_sentences_read_task_ids_as_degradations() -> None:
    sentences = task_sentences(("derain", "snow_flakes"), "a photo with {}")
    assert sentences == ["a photo with rain streaks", "a photo with snow flakes"]


# -- prompt weighting -------------------------------------------------------------------------


def test_mix_prompt_weights_interpolates_between_clip_and_features() -> None:
    clip_w = torch.tensor([[0.7, 0.2, 0.1]])
    feat_w = torch.tensor([[0.1, 0.1, 0.8]])
    assert torch.equal(mix_prompt_weights(clip_w, feat_w, 1.0), clip_w)
    assert torch.equal(mix_prompt_weights(clip_w, feat_w, 0.0), feat_w)
    half = mix_prompt_weights(clip_w, feat_w, 0.5)
    assert torch.allclose(half, (clip_w + feat_w) / 2) and torch.allclose(half.sum(), torch.ones(1))


def test_fusion_weight_one_makes_prompt_weights_the_clip_softmax() -> None:
    model = build("clip_prompt", fusion_weight=1.0).eval()
    x = torch.rand(SHAPE)
    with torch.no_grad():
        clip_weights = model.degradation_logits(x).softmax(dim=-1)
        for level, block in model.prompt_blocks.items():
            channels = model.unet.decoder_channels(int(level))
            features = torch.randn(2, channels, 4, 4)
            assert torch.allclose(block.weights(features, clip_weights), clip_weights)


def test_fusion_weight_outside_unit_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="fusion_weight"):
        build("clip_prompt", fusion_weight=1.5)


def test_focal_loss_reaches_the_clip_adapter() -> None:
    # CLIP itself is frozen, so the adapter on its image embedding is what the focal loss sharpens.
    model = build("clip_prompt")
    x = torch.rand(SHAPE)
    out = model(x, with_aux=True)
    loss, parts = total_loss(out, x, torch.tensor([0, 1]), aux_weights={"focal": 1.0})
    loss.backward()
    assert "focal" in parts
    assert model.clip_adapter[-1].weight.grad.abs().sum() > 0


# -- loading weights from local files -----------------------------------------------------------


def test_clip_prompt_loads_a_local_open_clip_state_dict(tmp_path) -> None:
    torch.manual_seed(123)
    reference = create_clip(TINY_CLIP)
    path = tmp_path / "clip.pt"
    torch.save(reference.state_dict(), path)
    model = build("clip_prompt", seed=0, pretrained_clip=str(path)).eval()
    assert state_equal(model.clip.visual, reference.visual)
    sentences = task_sentences(model.task_names, "a photo with {}")
    assert torch.allclose(model.text_embeddings, embed_texts(reference, TINY_CLIP, sentences))
    x = torch.rand(SHAPE)
    with torch.no_grad():
        assert torch.equal(model.clip(x), FrozenImageTower(reference)(x))


def test_missing_weight_files_are_named(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build("clip_prompt", pretrained_clip=str(missing / "clip.pt"))


def test_mismatched_clip_checkpoint_names_path_and_keys(tmp_path) -> None:
    path = tmp_path / "other_arch.pt"
    torch.save(nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(ValueError, match="other_arch.pt") as error:
        build("clip_prompt", pretrained_clip=str(path))
    message = str(error.value)
    assert "missing keys" in message and "unexpected keys: weight, bias" in message

    not_weights = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(ValueError, match="list.pt.*not hold a state dict"):
        build("clip_prompt", pretrained_clip=str(not_weights))


def test_load_state_file_reads_safetensors_and_unwraps_checkpoints(tmp_path) -> None:
    torch.manual_seed(0)
    source, target = nn.Linear(4, 2), nn.Linear(4, 2)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    load_state_file(target, tmp_path / "w.safetensors", "test")
    assert state_equal(source, target)
    # A training checkpoint saved from a DDP wrapper: {"state_dict": {"module.weight": ...}}.
    wrapped = {"state_dict": {f"module.{k}": v * 2 for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    load_state_file(target, tmp_path / "ckpt.pt", "test")
    assert torch.equal(target.weight, source.weight * 2)
    with pytest.raises(ValueError, match=r"shape mismatches.*weight \(2, 4\) vs \(3, 4\)"):
        load_state_file(nn.Linear(4, 3), tmp_path / "w.safetensors", "test")
