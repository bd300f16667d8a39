"""AM-PromptIR as its official code builds it: size, checkpoint layout, text prompts, loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from allinone import models
from allinone.models.am_promptir import frequency_l1

OFFICIAL_KEYS = Path(__file__).parent / "data" / "am_promptir_official_keys.txt"
SOT, EOT = 49406, 49407  # CLIP's start and end tokens


def tiny(seed: int = 0, **overrides) -> models.RestorationModel:
    torch.manual_seed(seed)
    return models.build("am_promptir", "tiny", **overrides).eval()


def task(model: models.RestorationModel, *names: str) -> torch.Tensor:
    return models.task_ids(names, model.task_names)


def test_paper_preset_has_the_official_parameter_count() -> None:
    assert models.get_entry("am_promptir").official.parameters == 48_425_687
    # Five 1x1 convolutions the official forward never calls (188,928) stay, frozen.
    assert models.parameter_counts("am_promptir", "paper") == (48_425_687, 48_236_759)


def test_paper_state_dict_is_the_official_checkpoint_layout() -> None:
    official = [line.split() for line in OFFICIAL_KEYS.read_text().splitlines()]
    with torch.device("meta"):
        model = models.build("am_promptir", "paper")
    ours = [[k, "x".join(map(str, v.shape))] for k, v in model.state_dict().items()]
    assert ours == official


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (2, 3, 20, 31)])
def test_tiny_restores_odd_sizes(shape: tuple[int, ...]) -> None:
    model = tiny()
    x = torch.rand(shape)
    with torch.no_grad():
        out = model(x, torch.arange(shape[0]) % model.num_tasks, with_aux=True)
    assert out.image.shape == x.shape and torch.isfinite(out.image).all()
    assert out.logits is None


def test_without_a_task_it_asks_for_one_unless_blind() -> None:
    x = torch.rand(2, 3, 24, 24)
    with pytest.raises(ValueError, match=r"needs the task.*blind=True"):
        tiny()(x)
    blind = tiny(blind=True)
    with torch.no_grad():
        out = blind(x, with_aux=True)
        told = blind(x, task(blind, "derain", "derain"), with_aux=True)
    assert out.image.shape == x.shape and out.logits.shape == (2, blind.num_tasks)
    chosen = out.logits.argmax(dim=-1)
    with torch.no_grad():
        assert torch.equal(out.image, blind(x, chosen))
    assert told.logits is not None  # the head trains against the label


def test_the_task_chooses_the_text_the_prompts_read() -> None:
    model = tiny()
    assert model.texts[model.task_names.index("dehaze")] == "dehazy"  # the official name
    assert model.texts[model.task_names.index("denoise")] == "denoise_25"
    assert tiny(task_texts={"dehaze": "haze"}).texts[model.task_names.index("dehaze")] == "haze"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        rain, haze = model(x, task(model, "derain")), model(x, task(model, "dehaze"))
    assert not torch.equal(rain, haze)


def test_a_batch_of_one_task_restores_each_image_as_alone() -> None:
    # The official text map of a batch interleaves its images' texts by rows: one text, one map.
    model = tiny()
    x = torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        both = model(x, task(model, "derain", "derain"))
        alone = torch.cat([model(x[i : i + 1], task(model, "derain")) for i in range(2)])
    assert torch.allclose(both, alone, atol=1e-6)


def test_texts_are_clip_tokens_of_the_features_half_width() -> None:
    model = tiny(task_texts={"sr": "a very long description " * 8})
    for level in (1, 2, 3):
        tokens = getattr(model, f"prompt{level}").text_tokens
        assert tokens.shape == (model.num_tasks, 8 * 2**level // 2)
        assert (tokens[:, 0] == SOT).all()
        assert tokens[0, -1] == EOT  # truncated, ending in the end token
    assert not any("text_tokens" in key for key in model.state_dict())


def test_fft_term_is_zero_for_identical_images_and_positive_otherwise() -> None:
    model = tiny()
    assert model.default_aux_weights == {"fft": 0.01}
    x, y = torch.rand(2, 3, 24, 40), torch.rand(2, 3, 24, 40)
    assert float(frequency_l1(x, x)) == 0.0
    assert float(frequency_l1(x, y)) > 0.0
    # The mean modulus of the spectra's difference, as nn.L1Loss on complex fft2 outputs.
    expected = torch.nn.L1Loss()(torch.fft.fft2(x), torch.fft.fft2(y))
    assert torch.allclose(frequency_l1(x, y), expected)
    out = model(x, task(model, "derain", "dehaze"), with_aux=True, target=y)
    assert torch.allclose(out.aux["fft"], frequency_l1(out.image, y))


def test_uncalled_convolutions_stay_frozen_and_prompts_train() -> None:
    model = tiny()
    model.train()
    x = torch.rand(1, 3, 24, 24)
    out = model(x, task(model, "derain"), with_aux=True, target=torch.rand_like(x))
    (out.image.abs().mean() + out.aux["fft"]).backward()
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert sorted({n.rsplit(".", 1)[0] for n in frozen}) == [
        "reduce_chan_level2",
        "reduce_chan_level3",
        "reduce_noise_channel_1",
        "reduce_noise_channel_2",
        "reduce_noise_channel_3",
    ]
    assert all(p.grad is None for p in frozen.values())
    assert all(p.grad is not None for p in model.prompt_parameters())
    assert float(model.prompt3.prompt_param.grad.abs().sum()) > 0
