"""``allinone models import``: an authors' released checkpoint becomes our checkpoint file, which
``restore`` and the registry take, with outputs equal to the network the release came from."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from allinone import models
from allinone.data.images import read_image, to_uint8
from allinone.evaluate.metrics import to_image, to_tensor
from conftest import TEST_SETS, allinone_cli

PHOTO = TEST_SETS / "CBSD68" / "101085.png"  # 481 x 321: not a multiple of the network's 8


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A PromptIR (tiny) saved as its authors release theirs: a Lightning checkpoint whose
    state dict carries the LightningModule's ``net.`` prefix, beside other training state."""
    folder = tmp_path_factory.mktemp("release")
    torch.manual_seed(7)
    network = models.build("promptir", "tiny").eval()
    state = {f"net.{k}": v for k, v in network.state_dict().items()}
    path = folder / "model.ckpt"
    torch.save({"epoch": 119, "global_step": 1000, "state_dict": state}, path)
    return network, path


def test_an_imported_release_restores_as_the_original_network(release, tmp_path) -> None:
    network, path = release
    ours = tmp_path / "promptir.pt"
    done = allinone_cli(
        "models", "import", "promptir", path, "--out", ours, "--preset", "tiny",
        "--tasks", "denoise,derain,dehaze",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    restored = allinone_cli("restore", PHOTO, "--model", ours, "--out", tmp_path / "out")
    assert restored.returncode == 0, restored.stderr[-2000:]
    with torch.no_grad():
        expected = to_uint8(to_image(network(to_tensor(read_image(PHOTO).pixels))))
    got = np.asarray(Image.open(tmp_path / "out" / PHOTO.name).convert("RGB"))
    assert got.shape == expected.shape == (481, 321, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # 8-bit rounding


def test_a_release_that_does_not_fit_is_refused_in_one_line(release, tmp_path) -> None:
    network, _ = release
    state = {f"net.{k}": v for k, v in network.state_dict().items()}
    dropped = sorted(state)[0]
    del state[dropped]
    state["net.extra.weight"] = torch.zeros(3)
    broken = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, broken)
    done = allinone_cli(
        "models", "import", "promptir", broken, "--out", tmp_path / "x.pt", "--preset", "tiny"
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(broken) in lines[0], done.stderr
    assert dropped.removeprefix("net.") in lines[0] and "extra.weight" in lines[0]
    assert not (tmp_path / "x.pt").exists()


def test_a_crafted_pickle_as_a_release_runs_nothing(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    crafted = tmp_path / "model.ckpt"
    torch.save({"state_dict": Payload()}, crafted)
    done = allinone_cli("models", "import", "promptir", crafted, "--out", tmp_path / "x.pt")
    assert done.returncode == 2 and str(crafted) in done.stderr
    assert not marker.exists()


def test_models_list_shows_the_official_counts() -> None:
    done = allinone_cli("models", "list", env={**os.environ, "COLUMNS": "200"})  # a row a line
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {
        tuple(cell.strip() for cell in line.split("│")[1:3]): line
        for line in done.stdout.splitlines()
        if line.count("│") > 4
    }
    assert "35,592,263" in rows["promptir", "paper"] and "yes" in rows["promptir", "paper"]
    assert "28,784,824" in rows["adair", "paper"]
    assert "27,429,510" in rows["pip", "paper"] and "none released" in rows["pip", "paper"]
