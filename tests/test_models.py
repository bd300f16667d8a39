"""The contract every registered model keeps (tiny presets), and the shared training loss."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from allinone import models
from allinone.losses import charbonnier, focal, l1, total_loss
from allinone.models import MODELS, Restoration

NAMES = sorted(MODELS)


def build(name: str, seed: int = 0) -> models.RestorationModel:
    torch.manual_seed(seed)
    return models.build(name, "tiny")


def labels(model: models.RestorationModel, n: int) -> torch.Tensor:
    return torch.arange(n) % model.num_tasks


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (2, 3, 64, 96)])
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_reaches_prompts(name: str, shape: tuple[int, ...]) -> None:
    model = build(name)
    x = torch.rand(shape)
    out = model(x, with_aux=True)
    assert isinstance(out, Restoration)
    assert out.image.shape == x.shape
    assert torch.isfinite(out.image).all()
    loss, _ = total_loss(out, torch.rand(shape), labels(model, shape[0]))
    loss.backward()
    prompts = [p for p in model.prompt_parameters() if p.requires_grad]
    assert prompts, f"{name} exposes no trainable prompt parameters"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in prompts)
    assert sum(float(p.grad.abs().sum()) for p in prompts) > 0


@pytest.mark.parametrize("name", NAMES)
def test_blind_and_told_inference(name: str) -> None:
    model = build(name).eval()
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        blind = model(x, with_aux=True)
        told = model(x, labels(model, 2), with_aux=True)
        plain = model(x)
    for out in (blind, told):
        assert out.image.shape == x.shape and torch.isfinite(out.image).all()
        assert out.logits is None or out.logits.shape == (2, model.num_tasks)
    assert isinstance(plain, torch.Tensor)
    assert torch.equal(plain, blind.image)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_init(name: str) -> None:
    first, second = build(name, seed=3).state_dict(), build(name, seed=3).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name: str, tmp_path) -> None:
    model = build(name, seed=1).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = build(name, seed=2).eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize("name", NAMES)
def test_one_train_step(name: str) -> None:
    # Time is printed, not asserted: the machine's load varies. Run with -s to see it.
    model = build(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, target, task = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), labels(model, 2)
    seconds = []
    for _ in range(3):  # the first step pays one-off allocations
        start = time.perf_counter()
        loss, _ = total_loss(model(x, task, with_aux=True), target, task)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    assert math.isfinite(float(loss.detach()))
    print(f"\n{name} tiny: one Adam step, 2x3x64x64: {min(seconds[1:]) * 1000:.0f} ms")


def test_build_errors_name_the_culprit() -> None:
    with pytest.raises(ValueError, match="no_such_model"):
        models.build("no_such_model")
    with pytest.raises(ValueError, match="no_such_preset"):
        models.build(NAMES[0], preset="no_such_preset")


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(8, 7), torch.randint(0, 7, (8,))
    assert torch.allclose(focal(logits, target, gamma=0.0), F.cross_entropy(logits, target))
    assert focal(logits, target, gamma=2.0) < F.cross_entropy(logits, target)


def test_charbonnier_is_a_smooth_l1() -> None:
    pred, target = torch.zeros(4), torch.tensor([0.0, 1.0, -2.0, 0.5])
    expected = (1e-3 + math.sqrt(1 + 1e-6) + math.sqrt(4 + 1e-6) + math.sqrt(0.25 + 1e-6)) / 4
    assert float(charbonnier(pred, target)) == pytest.approx(expected, rel=1e-6)
    assert float(charbonnier(pred, target)) >= float(l1(pred, target))
    assert float(charbonnier(target, target)) == pytest.approx(1e-3)


def test_total_loss_adds_weighted_aux_terms() -> None:
    out = Restoration(
        image=torch.zeros(1, 3, 2, 2),
        logits=torch.zeros(1, 2),  # uniform: p(true) = 0.5
        aux={"orthogonality": torch.tensor(2.0)},
    )
    weights = {"orthogonality": 0.002, "focal": 0.1}
    loss, parts = total_loss(out, torch.ones(1, 3, 2, 2), torch.tensor([1]), aux_weights=weights)
    focal_value = 0.25 * math.log(2)  # (1 - 0.5)^2 * -log(0.5)
    assert float(loss) == pytest.approx(1.0 + 0.002 * 2.0 + 0.1 * focal_value, rel=1e-6)
    assert parts == pytest.approx({"pixel": 1.0, "orthogonality": 2.0, "focal": focal_value})
    # Unknown task: no focal term; a zero weight logs a term without adding it.
    loss, parts = total_loss(out, torch.ones(1, 3, 2, 2), None, aux_weights={"orthogonality": 0})
    assert float(loss) == pytest.approx(1.0) and "focal" not in parts
