"""The contract every registered model keeps (tiny presets), and the shared training loss."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from allinone import models
from allinone.models import MODELS, Restoration
from allinone.train.losses import charbonnier, focal, l1, total_loss

NAMES = sorted(MODELS)
# Every preset that trains on a CPU (all but the papers' sizes), as "name:preset".
PRESETS = [f"{n}:{p}" for n in NAMES for p in MODELS[n].presets if not p.startswith("paper")]


def build(name: str, seed: int = 0) -> models.RestorationModel:
    """``name`` or ``name:preset`` (default tiny), seeded."""
    torch.manual_seed(seed)
    model_name, _, preset = name.partition(":")
    return models.build(model_name, preset or "tiny")


def labels(model: models.RestorationModel, n: int) -> torch.Tensor:
    return torch.arange(n) % model.num_tasks


def unless_told(model: models.RestorationModel, n: int) -> torch.Tensor | None:
    """No task for a blind model; the labels for one that restores only when told its task."""
    return labels(model, n) if model.needs_task else None


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (2, 3, 64, 96)])
@pytest.mark.parametrize("name", PRESETS)
def test_forward_backward_reaches_prompts(name: str, shape: tuple[int, ...]) -> None:
    model = build(name)
    x, target = torch.rand(shape), torch.rand(shape)
    # Training goes through forward with the target: a diffusion model answers with its own
    # objective (noise prediction) instead of an image.
    out = model(x, unless_told(model, shape[0]), with_aux=True, target=target)
    assert isinstance(out, Restoration)
    assert out.image is not None or out.aux, f"{name} gives neither an image nor an objective"
    if out.image is not None:
        assert out.image.shape == x.shape and torch.isfinite(out.image).all()
    loss, _ = total_loss(out, target, labels(model, shape[0]))
    loss.backward()
    prompts = [p for p in model.prompt_parameters() if p.requires_grad]
    assert prompts, f"{name} exposes no trainable prompt parameters"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in prompts)
    assert sum(float(p.grad.abs().sum()) for p in prompts) > 0


@pytest.mark.parametrize("name", PRESETS)
def test_blind_and_told_inference(name: str) -> None:
    model = build(name).eval()
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        blind = model(x, unless_told(model, 2), with_aux=True)
        told = model(x, labels(model, 2), with_aux=True)
        plain = model(x, unless_told(model, 2))
    for out in (blind, told):
        assert out.image.shape == x.shape and torch.isfinite(out.image).all()
        assert out.logits is None or out.logits.shape == (2, model.num_tasks)
    assert isinstance(plain, torch.Tensor)
    assert torch.equal(plain, blind.image)


@pytest.mark.parametrize("name", PRESETS)
def test_same_seed_same_init(name: str) -> None:
    first, second = build(name, seed=3).state_dict(), build(name, seed=3).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", PRESETS)
def test_save_load_round_trip(name: str, tmp_path) -> None:
    model = build(name, seed=1).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = build(name, seed=2).eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        task = unless_told(model, 1)
        assert torch.equal(model(x, task), fresh(x, task))


@pytest.mark.parametrize("name", PRESETS)
def test_one_train_step(name: str) -> None:
    # Time is printed, not asserted: the machine's load varies. Run with -s to see it.
    model = build(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, target, task = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), labels(model, 2)
    seconds = []
    for _ in range(3):  # the first step pays one-off allocations
        start = time.perf_counter()
        loss, _ = total_loss(model(x, task, with_aux=True, target=target), target, task)
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


def test_psnr_loss_is_minus_the_mean_psnr_of_the_images() -> None:
    from allinone.train.losses import psnr_loss

    target = torch.zeros(2, 3, 4, 4)
    pred = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 0.01)])
    # MSEs 1e-2 and 1e-4: PSNRs 20 and 40 dB, whatever the images' share of the pixels.
    assert float(psnr_loss(pred, target)) == pytest.approx(-30.0, abs=1e-3)


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


LIST_MODELS = """
import resource, sys
from allinone.cli.main import app
app(["models", "list"], standalone_mode=False)
print("peak-rss-kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def test_models_list_counts_without_building_weights() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "400"}  # one table row per line
    listed = subprocess.run(
        [sys.executable, "-c", LIST_MODELS], capture_output=True, text=True, env=env, timeout=300
    )
    assert listed.returncode == 0, listed.stderr
    rows = {}
    for line in listed.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) >= 4 and cells[2].replace(",", "").isdigit():
            rows[cells[0], cells[1]] = (
                int(cells[2].replace(",", "")),
                int(cells[3].replace(",", "")),
            )
    assert set(rows) == {(n, p) for n in NAMES for p in MODELS[n].presets}
    # The same numbers as real builds: a frozen CLIP tower counts as not trainable.
    for name in ("promptir", "clip_prompt"):
        model = models.build(name, "tiny")
        real = (models.count_parameters(model), models.count_parameters(model, trainable_only=True))
        assert rows[name, "tiny"] == real
    assert rows["clip_prompt", "tiny"][1] < rows["clip_prompt", "tiny"][0]
    # Built for real, the paper presets (one of 2B parameters, 8.5 GB of fp32) took over 9 GB;
    # counted on the meta device the process peaks at 1-2 GB (torch, diffusers, open_clip).
    peak_kib = int(listed.stderr.split("peak-rss-kib")[-1])
    assert rows["perceiver", "paper"][0] > 2 * 10**9 and peak_kib < 3 * 1024**2, peak_kib


def test_a_models_own_aux_weights_apply_unless_the_pipeline_names_them() -> None:
    from allinone.train.loop import aux_weights

    pip = models.build("pip", "tiny")
    assert aux_weights(pip, {}) == {"orthogonality": 0.002}, "PIP's paper weight"
    assert aux_weights(pip, {"orthogonality": 0.1, "focal": 0.5}) == {
        "orthogonality": 0.1,
        "focal": 0.5,
    }
    assert aux_weights(models.build("promptir", "tiny"), {}) == {}


def test_a_pipeline_starts_from_its_own_pretrained_checkpoint(tmp_path) -> None:
    from allinone.config import ConfigError, TrainSection, load_pipeline
    from allinone.curriculum.run import check_pretrained
    from allinone.models.spec import ModelSpec
    from allinone.train.job import StageJob
    from allinone.train.loop import build_model
    from conftest import REPO

    def pipeline(weights: str, name: str = "promptir") -> object:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"name: p\ntasks_dir: {REPO / 'tasks'}\ntasks: [denoise]\n"
            f"model: {{name: {name}, preset: tiny, pretrained: {weights}}}\n"
            "curriculum: {steps: [1]}\n"
        )
        return load_pipeline(path)

    with pytest.raises(ConfigError, match=r"model\.pretrained: weights file not found"):
        pipeline("missing.pt")
    torch.manual_seed(3)
    saved = models.build("promptir", "tiny", task_names=("denoise",))
    torch.save(saved.state_dict(), tmp_path / "mine.pt")
    fits = pipeline("mine.pt")  # relative to the pipeline file
    check_pretrained(fits)
    with pytest.raises(ConfigError, match=r"model\.pretrained: .*mine\.pt does not fit"):
        check_pretrained(pipeline("mine.pt", name="pip"))
    # The first stage's worker builds its model from those weights.
    job = StageJob(
        stage=0,
        stage_name="s",
        steps=1,
        model=ModelSpec("promptir", "tiny", task_names=("denoise",)),
        train=TrainSection(),
        batch_size=1,
        seed=0,
        init_weights=str(fits.pretrained),
    )
    built = build_model(job)
    for key, value in saved.state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key


BUILD_PROMPTIR = """
import json, sys
from allinone import models
models.build("promptir", "tiny")
heavy = sorted(m for m in ("diffusers", "open_clip", "timm") if m in sys.modules)
print(json.dumps([heavy, sorted(models.MODELS)]))
"""


def test_a_model_imports_only_its_own_module() -> None:
    """Building PromptIR in a Ray worker or a command must not pay for Stable Diffusion's and
    CLIP's libraries (seconds per process): the zoo imports an architecture when it is asked."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", BUILD_PROMPTIR], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    heavy, names = json.loads(done.stdout.strip().splitlines()[-1])
    assert heavy == [] and names == NAMES


def test_every_declared_model_is_registered_by_its_module() -> None:
    from allinone.models.base import ModelEntry, ModelRegistry

    entries = {name: MODELS[name] for name in MODELS}  # imports every module
    assert all(isinstance(e, ModelEntry) and e.name == n for n, e in entries.items())
    registry = ModelRegistry()
    with pytest.raises(ValueError, match="'stray' is registered but not declared"):
        registry.register(ModelEntry("stray", models.build, {}, "not in the table"))
