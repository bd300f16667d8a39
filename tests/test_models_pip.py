"""PIP as its official code builds it: size, checkpoint layout, regulariser and task guidance."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from allinone import models
from allinone.models.pip import PIP_TASKS, TOPM_RATIOS, TopMCrossAttention, orthogonality

OFFICIAL_KEYS = Path(__file__).parent / "data" / "pip_official_keys.txt"


def tiny(seed: int = 0, **overrides) -> models.RestorationModel:
    torch.manual_seed(seed)
    return models.build("pip", "tiny", **overrides).eval()


def set_task_prompts(model: models.RestorationModel, prompts: torch.Tensor) -> None:
    """Give every PIP module the same (T, D) task prompts, zero beyond D."""
    with torch.no_grad():
        for pip in model.pip_modules():
            pip.detask_prompt_param.zero_()
            pip.detask_prompt_param[0, :, : prompts.shape[1], 0, 0] = prompts


def test_paper_preset_has_the_official_parameter_count() -> None:
    entry = models.get_entry("pip")
    assert entry.official.parameters == 27_429_510
    assert models.parameter_counts("pip", "paper") == (27_429_510, 27_429_510)
    with torch.device("meta"):
        model = models.build("pip", "paper")
    # The official prompt machinery: PIP modules and prompt-to-feature blocks, about 3.13M.
    assert sum(p.numel() for p in model.prompt_parameters()) == 3_125_330
    assert model.task_names == PIP_TASKS


def test_paper_state_dict_is_the_official_checkpoint_layout() -> None:
    official = [line.split() for line in OFFICIAL_KEYS.read_text().splitlines()]
    with torch.device("meta"):
        model = models.build("pip", "paper")
    ours = [[k, "x".join(map(str, v.shape))] for k, v in model.state_dict().items()]
    assert ours == official


@pytest.mark.parametrize("blind", [False, True])
def test_tiny_restores_odd_sizes_with_and_without_a_label(blind: bool) -> None:
    model = tiny(blind=blind)
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        told = model(x, torch.tensor([2]), with_aux=True)
        untold = model(x, with_aux=True)
    for out in (told, untold):
        assert out.image.shape == x.shape and torch.isfinite(out.image).all()
        assert (out.logits is not None) == blind
    assert not torch.equal(told.image, untold.image)


def test_the_label_selects_its_own_task_prompt_only() -> None:
    model = tiny()
    x = torch.rand(2, 3, 32, 40)
    labels = torch.tensor([0, 0])
    with torch.no_grad():
        before = model(x, labels)
        for pip in model.pip_modules():
            pip.detask_prompt_param[:, 1:] += 1.0  # every other task's prompt
        after = model(x, labels)
        other = model(x, torch.tensor([1, 1]))
    assert torch.equal(before, after)
    assert not torch.allclose(before, other)


def test_blind_head_weighs_prompts_only_without_a_label() -> None:
    model = tiny(blind=True)
    x = torch.rand(2, 3, 32, 32)
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        told, untold = model(x, labels, with_aux=True), model(x, with_aux=True)
        model.degradation_head.weight.add_(torch.randn_like(model.degradation_head.weight))
        told_again, untold_again = model(x, labels, with_aux=True), model(x, with_aux=True)
    assert told.logits.shape == (2, model.num_tasks)
    assert torch.equal(told.image, told_again.image)  # the label, not the head, chose the prompt
    assert not torch.equal(untold.image, untold_again.image)
    assert not torch.equal(told.logits, told_again.logits)


def test_without_label_or_head_every_task_prompt_weighs_the_same() -> None:
    model = tiny()
    weights = model.task_weights(None, None, 3)
    assert torch.equal(weights, torch.full((3, model.num_tasks), 1 / model.num_tasks))
    one_hot = model.task_weights(torch.tensor([4]), None, 1)
    assert one_hot.tolist() == [[1.0 if t == 4 else 0.0 for t in range(model.num_tasks)]]


def test_orthogonality_is_the_official_hinge_on_positive_cosines() -> None:
    torch.manual_seed(0)
    prompts = torch.randn(5, 7, 1, 1)
    cosines = [
        torch.dot(prompts[i].flatten(), prompts[j].flatten())
        / (prompts[i].norm() * prompts[j].norm())
        for i in range(5)
        for j in range(i + 1, 5)
    ]
    expected = 0.01 * sum(float(c) for c in cosines if c > 0)
    assert float(orthogonality(prompts)) == pytest.approx(expected, rel=1e-6)
    # Opposite prompts cost nothing: only angles under 90 degrees are penalised.
    assert float(orthogonality(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))) == 0.0


def test_model_orthogonality_is_zero_for_orthogonal_prompts_and_sums_three_skips() -> None:
    model = tiny(task_names=("a", "b", "c"))
    assert model.default_aux_weights == {"orthogonality": 0.002}
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        set_task_prompts(model, torch.eye(3) * 3.0)  # the norm is irrelevant
        orthogonal = model(x, with_aux=True).aux["orthogonality"]
        # cos(p0, p1) = 1/sqrt(2); p2 = -p0 is opposite p0 and at 135 degrees from p1.
        set_task_prompts(model, torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0], [-1.0, 0, 0]]))
        hand_made = model(x, with_aux=True).aux["orthogonality"]
        set_task_prompts(model, torch.ones(3, 3))
        identical = model(x, with_aux=True).aux["orthogonality"]
    assert float(orthogonal) == 0.0
    assert float(hand_made) == pytest.approx(3 * 0.01 / math.sqrt(2), rel=1e-6)
    assert float(identical) == pytest.approx(3 * 0.01 * 3, rel=1e-6)  # 3 skips x 3 pairs


def test_top_m_attention_keeps_exactly_m_keys_per_channel_at_each_ratio() -> None:
    torch.manual_seed(0)
    attention = TopMCrossAttention(dim=40, num_heads=2)  # 20 channels per head
    channels = 20
    identity = torch.eye(channels).expand(1, 2, channels, channels)
    for scores in (torch.randn(1, 2, channels, channels), torch.zeros(1, 2, channels, channels)):
        for i, (num, den) in enumerate(TOPM_RATIOS, 1):
            with torch.no_grad():
                for j in range(1, len(TOPM_RATIOS) + 1):
                    getattr(attention, f"attn{j}").fill_(1.0 if j == i else 0.0)
                attn = attention.attend(scores, identity)  # @ identity: the attention itself
            m = channels * num // den  # the official int(C * ratio): 10, 13, 15, 16
            assert ((attn > 0).sum(dim=-1) == m).all()
            assert torch.allclose(attn.sum(dim=-1), torch.ones(1, 2, channels))
    with pytest.raises(ValueError, match="2 channels per head"):
        TopMCrossAttention(dim=4, num_heads=4)
