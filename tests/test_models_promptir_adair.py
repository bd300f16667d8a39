"""PromptIR and AdaIR are the published networks: official parameter counts, official checkpoint
keys and shapes, any image size, blind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from allinone import models
from allinone.models.adair import FreModule
from allinone.models.importer import official_state_dict

DATA = Path(__file__).parent / "data"
# Counted from the authors' code (random init): facts, not our numbers.
OFFICIAL = {"promptir": 35_592_263, "adair": 28_784_824}
# Parameters the official graphs never give a gradient, which we keep frozen: PromptIR's six
# uncalled convolutions; AdaIR's uncalled conv and score_gen plus rate_conv (behind an int cast).
FROZEN = {"promptir": 215_296, "adair": 18_738 + 24_360}


def official_keys(name: str) -> dict[str, torch.Tensor]:
    """The released checkpoint's state dict as meta tensors of the recorded shapes."""
    state = {}
    for line in (DATA / f"{name}_official_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split()
            state[key] = torch.empty(tuple(map(int, shape.split(","))), device="meta")
    return state


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_paper_preset_is_the_official_network_parameter_for_parameter(name: str) -> None:
    total, trainable = models.parameter_counts(name, "paper")
    assert total == OFFICIAL[name] == models.get_entry(name).official.parameters
    assert total - trainable == FROZEN[name]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_checkpoint_keys_and_shapes_are_ours(name: str) -> None:
    state = official_keys(name)
    assert all(key.startswith("net.") for key in state)
    mapped = official_state_dict(name, state, "paper", source=name)  # raises on any mismatch
    with torch.device("meta"):
        ours = models.build(name, "paper").state_dict()
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_tiny_restores_odd_sizes_blind(name: str) -> None:
    torch.manual_seed(0)
    model = models.build(name, "tiny").eval()
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        blind = model(x)
        told = model(x, torch.tensor([2]))
    assert blind.shape == x.shape and torch.isfinite(blind).all()
    assert torch.equal(blind, told), "the published networks never read a task id"


def test_promptir_level_three_is_the_official_narrow_one() -> None:
    with torch.device("meta"):
        model = models.build("promptir", "paper")
    assert model.reduce_noise_level3.weight.shape == (192, 704, 1, 1)
    assert model.up4_3.body[0].weight.shape == (384, 192, 3, 3)  # 192 -> 96 after the shuffle
    assert model.reduce_chan_level3.weight.shape == (192, 288, 1, 1)


def test_promptir_without_latent_prompt_has_restormers_level_three() -> None:
    torch.manual_seed(0)
    model = models.build("promptir", "tiny", prompt_levels=[1, 2]).eval()
    assert not hasattr(model, "prompt3") and model.up4_3.body[0].in_channels == 16 * 8
    with torch.no_grad():
        assert model(torch.rand(1, 3, 24, 40)).shape == (1, 3, 24, 40)


def test_adair_low_band_is_a_box_around_dc_that_small_maps_never_get() -> None:
    block = FreModule(16, 2)
    for conv in (block.rate_conv[0], block.rate_conv[2]):
        torch.nn.init.constant_(conv.weight, 0.1)  # a rate of about 0.58 on an input of ones
    large = block._low_band(torch.ones(1, 16, 256, 256))
    # 256 // 128 * 0.58 truncates to a half-size of 1: rows and columns -1 and 0 around DC.
    assert int(large.sum()) == 4 and large[0, 0, 0, 0] and large[0, 0, -1, -1]
    # The official truncation leaves every map under 256 pixels a side without a low band.
    small = block._low_band(torch.ones(1, 16, 255, 255))
    assert not small.any()
    high, low = block.bands(torch.rand(1, 16, 40, 40))
    assert torch.equal(low, torch.zeros_like(low)) and high.shape == (1, 16, 40, 40)


@pytest.mark.parametrize(
    ("name", "modules"),
    [
        ("adair", {"fre1", "fre2", "fre3"}),
        (
            "promptir",
            {f"{m}{i}" for m in ("prompt", "noise_level", "reduce_noise_level") for i in (1, 2, 3)},
        ),
    ],
)
def test_prompt_parameters_are_the_papers_guiding_blocks(name: str, modules: set[str]) -> None:
    model = models.build(name, "tiny")
    chosen = {id(p) for p in model.prompt_parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in chosen}
    assert {n.split(".")[0] for n in names} == modules
