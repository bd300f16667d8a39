"""MiOIR's published networks (explicit / adaptive prompts on Restormer, the degradation
classifier) and the platform's own FiLM U-Net that used to carry MiOIR's name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from allinone import models
from allinone.models import film_unet  # noqa: F401  registers film_unet if models/ does not yet
from allinone.models.importer import official_state_dict
from allinone.models.mioir import CLASSIFIER, OFFICIAL_TASKS, TYPE_MAPS, official_cross_entropy
from allinone.models.weights import state_dict_mismatch

DATA = Path(__file__).parent / "data"
# Counted from the official code (random init): Restormer_EP, Restormer_AP, Classifier.
OFFICIAL_EP, OFFICIAL_AP, OFFICIAL_CLASSIFIER = 26_547_578, 26_572_666, 188_551


def _on_meta(name: str, **overrides) -> models.RestorationModel:
    with torch.device("meta"):
        return models.build(name, "paper", **overrides)


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def test_paper_parameter_counts_equal_the_official_figures() -> None:
    assert models.parameter_counts("mioir_adaptive", "paper") == (OFFICIAL_AP, OFFICIAL_AP)
    # The published EP system is Restormer_EP plus its classifier; restoration stages train the
    # first alone.
    system = OFFICIAL_EP + OFFICIAL_CLASSIFIER
    assert models.parameter_counts("mioir_explicit", "paper") == (system, OFFICIAL_EP)
    explicit = _on_meta("mioir_explicit")
    assert _count(explicit.restorer_parameters()) == OFFICIAL_EP
    assert _count(explicit.classifier_parameters()) == OFFICIAL_CLASSIFIER
    for name in ("mioir_explicit", "mioir_adaptive"):
        official = models.get_entry(name).official
        assert official is not None and official.repository == "Xiangtaokong/MiOIR"
        assert official.parameters == models.parameter_counts(name, "paper")[0]


def _official_keys(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The official release's tensors (on meta) from the key list in tests/data."""
    state = {}
    for line in (DATA / f"{name}_official_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split()
            state[prefix + key] = torch.empty(*map(int, shape.split(",")), device="meta")
    return state


def test_paper_state_dicts_are_the_official_releases() -> None:
    assert state_dict_mismatch(_on_meta("mioir_adaptive"), _official_keys("mioir_adaptive")) == ""
    # EP: Restormer_M_EP.pth, Classifier.pth under "classifier.", and type7.npy's maps.
    release = _official_keys("mioir_explicit")
    extra = {
        **_official_keys("mioir_classifier", CLASSIFIER),
        TYPE_MAPS: torch.empty(7, 128, 128, device="meta"),
    }
    assert state_dict_mismatch(_on_meta("mioir_explicit"), {**release, **extra}) == ""
    assert models.get_entry("mioir_explicit").official.prompts_key == TYPE_MAPS
    # Through the importer's own mapping (BasicSR's "module." prefix allowed).
    wrapped = {f"module.{k}": v for k, v in release.items()}
    assert (
        official_state_dict("mioir_explicit", wrapped, extra=extra).keys()
        == {
            **release,
            **extra,
        }.keys()
    )


@pytest.mark.parametrize("name", ["mioir_explicit", "mioir_adaptive"])
@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (2, 3, 19, 70)])
def test_tiny_restores_odd_sizes(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = models.build(name, "tiny").eval()
    x = torch.rand(shape)
    with torch.no_grad():
        out = model(x, with_aux=True)
    assert out.image.shape == x.shape and torch.isfinite(out.image).all()


def test_type_maps_are_fixed_and_an_import_replaces_them() -> None:
    torch.manual_seed(1)
    first = models.build("mioir_explicit", "tiny")
    torch.manual_seed(2)
    second = models.build("mioir_explicit", "tiny")
    maps = getattr(first, TYPE_MAPS)
    assert maps.shape == (7, 128, 128) and torch.equal(maps, getattr(second, TYPE_MAPS))
    released = torch.rand(7, 128, 128)
    first.load_state_dict({**first.state_dict(), TYPE_MAPS: released})
    assert torch.equal(getattr(first, TYPE_MAPS), released)


def _decisive_classifier(model: models.RestorationModel, slot: int) -> None:
    """Make the classifier answer ``slot`` (a row of the official order) for every image."""
    with torch.no_grad():
        model.classifier.lastOut.weight.zero_()
        model.classifier.lastOut.bias.copy_(F.one_hot(torch.tensor(slot), 7) * 10.0)


def test_explicit_uses_the_tasks_map_and_blind_the_classifiers_hard_choice() -> None:
    torch.manual_seed(0)
    model = models.build("mioir_explicit", "tiny").eval()
    x = torch.rand(1, 3, 40, 48)
    derain = torch.tensor([model.task_names.index("derain")])
    with torch.no_grad():
        told = {t: model(x, torch.tensor([i])) for i, t in enumerate(model.task_names)}
        assert all(not torch.allclose(told["derain"], told[t]) for t in told if t != "derain")
        # Derain's output is a function of derain's official map (row 3) alone.
        maps = getattr(model, TYPE_MAPS)
        maps[OFFICIAL_TASKS.index("denoise")] = maps[OFFICIAL_TASKS.index("derain")]
        denoise = torch.tensor([model.task_names.index("denoise")])
        assert torch.equal(model(x, denoise), told["derain"])
        _decisive_classifier(model, OFFICIAL_TASKS.index("derain"))
        blind = model(x, with_aux=True)
    assert blind.logits.shape == (1, model.num_tasks)
    assert torch.equal(blind.logits.argmax(dim=-1), derain)
    assert torch.equal(blind.image, told["derain"])


def test_tasks_outside_the_official_seven_get_maps_of_their_own() -> None:
    model = models.build("mioir_explicit", "tiny", task_names=["dehaze", "desnow", "denoise"])
    assert getattr(model, TYPE_MAPS).shape == (8, 128, 128)
    assert model.task_rows.tolist() == [4, 7, 1]
    assert model.classifier.lastOut.out_features == 8
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32), with_aux=True).logits
    assert logits.shape == (2, 3)


def test_restoration_stages_freeze_the_classifier_and_its_stage_freezes_the_rest() -> None:
    restorer = models.build("mioir_explicit", "tiny")
    assert not any(p.requires_grad for p in restorer.classifier_parameters())
    assert all(p.requires_grad for p in restorer.restorer_parameters())
    x, target, task = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), torch.tensor([0, 4])
    told = restorer(x, task, with_aux=True, target=target)
    assert told.logits is None and "cross_entropy" not in told.aux

    classifier = models.build("mioir_explicit", "tiny", trains="classifier")
    assert all(p.requires_grad for p in classifier.classifier_parameters())
    assert not any(p.requires_grad for p in classifier.restorer_parameters())
    out = classifier(x, task, with_aux=True, target=target)
    assert torch.equal(out.aux["cross_entropy"], official_cross_entropy(out.logits, task))
    assert classifier.default_aux_weights == {"focal": 0.0}  # the official loss, not ours
    out.aux["cross_entropy"].backward()
    assert all(p.grad is not None for p in classifier.classifier_parameters())
    with pytest.raises(ValueError, match="trains"):
        models.build("mioir_explicit", "tiny", trains="both")


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


def test_classifier_learns_to_tell_noise_from_blur_alone() -> None:
    torch.manual_seed(0)
    model = models.build(
        "mioir_explicit", "tiny", task_names=["denoise", "deblur"], trains="classifier"
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(40):
        images, labels = _degrade(_piecewise_flat(16))
        loss = official_cross_entropy(model.classify(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, labels = _degrade(_piecewise_flat(64))
    with torch.no_grad():
        chosen = model.classify(images).argmax(dim=-1)
    assert (chosen == labels).float().mean() > 0.9


# Measured on the code before the move (mioir_adaptive, same presets): parameters, and the sum
# and absolute sum of the output of a build seeded 0 on torch.manual_seed(1)'s 1x3x37x45 input.
FILM_UNET_BEFORE = {
    "tiny": (882_144, 2374.1197136440314, 2460.002077551093),
    "cpu": (1_192_428, 2643.902695991099, 2702.3481238372624),
    "tiny_restormer": (1_040_269, 2741.35982166091, 2744.820142378565),
}


@pytest.mark.parametrize("preset", sorted(FILM_UNET_BEFORE))
def test_film_unet_is_the_model_it_was_under_mioirs_name(preset: str) -> None:
    parameters, total, absolute = FILM_UNET_BEFORE[preset]
    assert models.parameter_counts("film_unet", preset) == (parameters, parameters)
    torch.manual_seed(0)
    model = models.build("film_unet", preset).eval()
    torch.manual_seed(1)
    x = torch.rand(1, 3, 37, 45)
    with torch.no_grad():
        y = model(x).double()
    assert float(y.sum()) == pytest.approx(total, rel=1e-6)
    assert float(y.abs().sum()) == pytest.approx(absolute, rel=1e-6)
