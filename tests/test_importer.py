"""Importing official released checkpoints: the layouts authors ship, strictly, running no code."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from allinone import models
from allinone.models import MODELS
from allinone.models.checkpoint import load_checkpoint, save_checkpoint
from allinone.models.importer import CheckpointImportError, import_official


def released(name: str, seed: int = 0) -> tuple[models.RestorationModel, dict[str, torch.Tensor]]:
    """A tiny network with random weights (prompts too), and its state dict as the authors'
    code would hold it."""
    torch.manual_seed(seed)
    model = models.build(name, "tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def lightning(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """PromptIR's and AdaIR's release layout: a LightningModule's checkpoint, network in .net."""
    return {
        "epoch": 119,
        "global_step": 1000,
        "pytorch-lightning_version": "2.0.2",
        "state_dict": {f"net.{k}": v for k, v in state.items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999)}]}],
        "lr_schedulers": [{"last_epoch": 119, "base_lrs": [2e-4]}],
    }


def restored(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.eval()(torch.rand(1, 3, 29, 35))


def test_a_lightning_release_imports_and_restores_identically(tmp_path: Path) -> None:
    model, state = released("promptir")
    path = tmp_path / "model.ckpt"
    torch.save(lightning(state), path)
    checkpoint = import_official("promptir", path, preset="tiny")
    assert torch.equal(restored(checkpoint.build()), restored(model))
    assert checkpoint.provenance == {
        "imported_from": "model.ckpt",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "layout": "lightning",
        "repository": "va1shn9v/PromptIR",
        "arch": "promptir",
        "preset": "tiny",
    }
    # Our own file of it rebuilds the same network.
    again = load_checkpoint(save_checkpoint(tmp_path / "promptir.pt", checkpoint))
    assert again.spec.name == "promptir" and again.provenance == checkpoint.provenance
    assert torch.equal(restored(again.build()), restored(model))


@pytest.mark.parametrize(
    "layout",
    ["basicsr params", "basicsr params_ema", "plain", "module.", "module.net.", "safetensors"],
)
def test_the_layouts_authors_ship_import(tmp_path: Path, layout: str) -> None:
    model, state = released("adair")
    _, other = released("adair", seed=7)
    path = tmp_path / ("adair.safetensors" if layout == "safetensors" else "adair.pth")
    payloads = {
        # Both kept: "params" is what the authors' BasicSR test code loads.
        "basicsr params": {"params": state, "params_ema": other},
        "basicsr params_ema": {"params_ema": state},
        "plain": state,
        "module.": {f"module.{k}": v for k, v in state.items()},
        "module.net.": {f"module.net.{k}": v for k, v in state.items()},
    }
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(payloads[layout], path)
    checkpoint = import_official("adair", path, preset="tiny")
    assert torch.equal(restored(checkpoint.build()), restored(model))
    assert checkpoint.provenance["repository"] == "c-yn/AdaIR"


def test_extra_tensors_complete_a_release_by_our_key_names(tmp_path: Path) -> None:
    model, state = released("promptir")
    kept_outside = "prompt2.prompt_param"
    file_state = {k: v for k, v in state.items() if k != kept_outside}
    path = tmp_path / "model.ckpt"
    torch.save(lightning(file_state), path)
    checkpoint = import_official(
        "promptir", path, "tiny", extra={kept_outside: state[kept_outside]}
    )
    assert torch.equal(restored(checkpoint.build()), restored(model))
    assert checkpoint.provenance["extra"] == [kept_outside]
    with pytest.raises(CheckpointImportError, match="already in the file"):
        import_official("promptir", path, "tiny", extra={"output.weight": state["output.weight"]})


def one_line_refusal(*args: object, **kwargs: object) -> str:
    with pytest.raises(CheckpointImportError) as caught:
        import_official(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("fault", ["missing", "unexpected", "mis-shaped"])
def test_anything_but_the_exact_network_is_refused_in_one_line(tmp_path: Path, fault: str) -> None:
    _, state = released("promptir")
    if fault == "missing":
        del state["noise_level2.attn.temperature"]
    elif fault == "unexpected":
        state["prompt4.prompt_param"] = torch.zeros(1)
    else:
        state["prompt1.linear_layer.weight"] = torch.zeros(5, 7)
    path = tmp_path / "model.ckpt"
    torch.save(lightning(state), path)
    message = one_line_refusal("promptir", path, "tiny")
    assert str(path) in message and "not the official promptir (tiny)" in message
    expected = {
        "missing": "1 missing keys: noise_level2.attn.temperature",
        "unexpected": "1 unexpected keys: prompt4.prompt_param",
        "mis-shaped": "prompt1.linear_layer.weight (5, 7) vs (5, 32)",
    }
    assert expected[fault] in message


def test_a_paper_release_does_not_fit_the_tiny_preset(tmp_path: Path) -> None:
    _, state = released("adair")
    path = tmp_path / "adair.pth"
    torch.save(state, path)
    assert "shape mismatches" in one_line_refusal("adair", path)  # default: the paper preset


class _Payload:
    """Unpickling it would create ``marker``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"net.output.weight": _Payload(marker)}}, path)
    message = one_line_refusal("promptir", path, "tiny")
    assert str(path) in message and "never runs code" in message
    assert not marker.exists()


def test_files_that_are_no_release_are_refused_in_one_line(tmp_path: Path) -> None:
    assert "no such file" in one_line_refusal("promptir", tmp_path / "absent.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a torch file")
    assert "not a loadable checkpoint" in one_line_refusal("promptir", junk)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    assert "holds no state dict" in one_line_refusal("promptir", empty)


def test_only_published_networks_import(tmp_path: Path) -> None:
    ours = sorted(n for n, e in MODELS.items() if e.official is None)
    if not ours:
        pytest.skip("every registered model is a published network")
    message = one_line_refusal(ours[0], tmp_path / "x.pt")
    assert "official checkpoints import for:" in message and "promptir" in message
    assert "adair" in message
    assert "unknown model" in one_line_refusal("nosuchnet", tmp_path / "x.pt")
