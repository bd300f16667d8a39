"""Properties specific to PIP and MiOIR: the parts that make them what the papers describe."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from allinone import models
from allinone.losses import focal
from allinone.models.pip import keep_top_m, num_kept


def test_pip_orthogonality_is_zero_for_orthonormal_prompts_and_positive_for_identical() -> None:
    model = models.build("pip", "tiny")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for pip in model.prompt_skips:
            pip.task_prompts.copy_(torch.eye(*pip.task_prompts.shape) * 3.0)  # norm is irrelevant
        orthonormal = model(x, with_aux=True).aux["orthogonality"]
        for pip in model.prompt_skips:
            pip.task_prompts.copy_(torch.ones_like(pip.task_prompts))
        identical = model(x, with_aux=True).aux["orthogonality"]
    assert float(orthonormal) < 1e-10
    tasks = model.num_tasks
    assert float(identical) == tasks * (tasks - 1)  # every off-diagonal cosine is 1


def test_pip_top_m_keeps_exactly_m_keys_per_query() -> None:
    torch.manual_seed(0)
    scores = torch.randn(2, 5, 10, 64)
    kept = keep_top_m(scores, 7)
    assert ((kept > float("-inf")).sum(dim=-1) == 7).all()
    # The survivors are the m largest, unchanged.
    top = scores.topk(7, dim=-1).values
    assert torch.equal(kept.topk(7, dim=-1).values, top)
    # Ties must not let more than m through.
    assert ((keep_top_m(torch.zeros(3, 16), 4) == 0).sum(dim=-1) == 4).all()
    # Softmax then spreads over exactly m keys.
    assert ((kept.softmax(dim=-1) > 0).sum(dim=-1) == 7).all()
    assert num_kept(64, 0.5) == 32 and num_kept(10, 0.31) == 4 and num_kept(3, 0.01) == 1


def test_mioir_explicit_task_ids_steer_the_output() -> None:
    torch.manual_seed(0)
    model = models.build("mioir_explicit", "tiny").eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        outputs = [model(x, torch.tensor([task])) for task in range(model.num_tasks)]
        blind = model(x, with_aux=True)
    assert all(not torch.allclose(outputs[0], other) for other in outputs[1:])
    assert blind.logits is not None and blind.logits.shape == (1, model.num_tasks)


def _piecewise_flat(n: int) -> torch.Tensor:
    # Flat patches with hard edges: blur has edges to erase, noise has flat areas to speckle.
    return F.interpolate(torch.rand(n, 3, 8, 8), size=(32, 32), mode="nearest")


def _degrade(clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First half: strong Gaussian noise (label 0); second half: Gaussian blur (label 1)."""
    half = len(clean) // 2
    noisy = (clean[:half] + 0.2 * torch.randn_like(clean[:half])).clamp(0, 1)
    taps = torch.exp(-((torch.arange(7.0) - 3) ** 2) / (2 * 2.0**2))
    kernel = (taps[:, None] * taps[None, :] / taps.sum() ** 2).expand(3, 1, 7, 7)
    blurred = F.conv2d(F.pad(clean[half:], (3, 3, 3, 3), mode="reflect"), kernel, groups=3)
    labels = torch.cat([torch.zeros(half), torch.ones(len(clean) - half)]).long()
    return torch.cat([noisy, blurred]), labels


def test_mioir_classifier_learns_to_tell_noise_from_blur() -> None:
    torch.manual_seed(0)
    model = models.build("mioir_explicit", "tiny", task_names=["denoise", "deblur"])
    classifier = model.prompt.classifier
    optimizer = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    for _ in range(40):
        images, labels = _degrade(_piecewise_flat(16))
        loss = focal(classifier(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, labels = _degrade(_piecewise_flat(64))
    with torch.no_grad():
        blind = model(images, with_aux=True)
    accuracy = (blind.logits.argmax(dim=-1) == labels).float().mean()
    assert accuracy > 0.9
