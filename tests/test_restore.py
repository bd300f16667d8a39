"""``allinone restore``: real photos of several kinds in, restored PNGs out, bad files skipped."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allinone.cli.restore import RestoreError, RestoreJob, restore_images
from allinone.config import load_pipeline
from allinone.data.images import read_image, to_uint8
from allinone.evaluate.metrics import to_image, to_tensor
from allinone.tracking.resolve import resolve_model, write_model_card
from conftest import TEST_SETS, allinone_cli
from test_curriculum import write_pipeline
from test_shards import bomb_png

COLOUR = TEST_SETS / "CBSD68" / "101085.png"  # 321 x 481
GREY = TEST_SETS / "Set12" / "01.png"  # 256 x 256, one channel


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("restore")
    pipeline = load_pipeline(write_pipeline(folder, "restore", steps=(2, 2)))
    torch.manual_seed(0)
    weights = folder / "stages" / "stage2-dehaze" / "model.pt"
    weights.parent.mkdir(parents=True)
    torch.save(pipeline.config.model_spec.build().state_dict(), weights)
    write_model_card(weights, pipeline.config, "stage2-dehaze")
    return weights


@pytest.fixture
def inputs(tmp_path) -> Path:
    """A folder of real images as users have them: grey, RGBA, 16-bit, nested, and one broken."""
    folder = tmp_path / "in"
    (folder / "nested").mkdir(parents=True)
    photo = Image.open(COLOUR).convert("RGB").crop((0, 0, 120, 90))
    rgba = photo.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(folder / "rgba.png")
    grey16 = np.asarray(Image.open(GREY).crop((0, 0, 70, 50)), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(folder / "nested" / "grey16.png")
    Image.open(GREY).save(folder / "grey.png")
    (folder / "broken.png").write_bytes(COLOUR.read_bytes()[:3000])  # truncated mid-stream
    (folder / "notes.txt").write_text("not an image, not listed")
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return allinone_cli("restore", *args)


def test_restore_a_file_and_a_folder_skipping_the_broken_one(checkpoint, inputs, tmp_path) -> None:
    out = tmp_path / "out"
    result = _cli(COLOUR, inputs, "--model", checkpoint, "--out", out, "--tile", "64")
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"skipped {inputs / 'broken.png'}: cannot decode image" in result.stderr
    assert "Traceback" not in result.stderr and "4 restored" in result.stdout
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert written == ["101085.png", "grey.png", "nested", "nested/grey16.png", "rgba.png"]
    expected = {
        "101085.png": ("RGB", (321, 481)),
        "grey.png": ("L", (256, 256)),
        "nested/grey16.png": ("L", (70, 50)),
        "rgba.png": ("RGBA", (120, 90)),  # its alpha put back
    }
    for name, (mode, size) in expected.items():
        with Image.open(out / name) as image:
            assert (image.mode, image.size) == (mode, size), name

    refused = _cli(inputs / "rgba.png", "--model", checkpoint, "--out", out)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert f"{out / 'rgba.png'} exists; pass --overwrite" in refused.stderr


def test_outputs_are_the_model_applied_to_the_decoded_input(checkpoint, inputs, tmp_path) -> None:
    resolved = resolve_model(str(checkpoint))
    sources = [COLOUR, inputs / "nested" / "grey16.png"]
    job = RestoreJob.plan(sources, tmp_path / "out", "dehaze", None, overwrite=False)
    report = restore_images(resolved, job)
    assert not report.failed and len(report.written) == 2
    task_id = torch.tensor([resolved.task_names.index("dehaze")])
    for source, written in zip(sources, report.written, strict=True):
        pixels = read_image(source).pixels
        with torch.no_grad():
            restored = to_image(resolved.module(to_tensor(pixels), task_id))
        with Image.open(written) as image:
            if image.mode == "L":  # a grey input comes back grey
                restored = restored.mean(axis=2)
            np.testing.assert_array_equal(np.asarray(image), to_uint8(restored))
    # --overwrite replaces the outputs; without it the plan is refused before any work.
    again = RestoreJob.plan(sources, tmp_path / "out", "dehaze", None, overwrite=True)
    assert len(restore_images(resolved, again).written) == 2


def test_requests_refused_whole(checkpoint, inputs, tmp_path) -> None:
    with pytest.raises(RestoreError, match="no such file or folder"):
        RestoreJob.plan([tmp_path / "missing.png"], tmp_path / "out", "auto", None, False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RestoreError, match="no image files in this folder"):
        RestoreJob.plan([tmp_path / "empty"], tmp_path / "out", "auto", None, False)
    same_name = tmp_path / "other" / "grey.png"
    same_name.parent.mkdir()
    same_name.write_bytes(GREY.read_bytes())
    with pytest.raises(RestoreError, match="would both be written to"):
        RestoreJob.plan([inputs / "grey.png", same_name], tmp_path / "out", "auto", None, False)
    job = RestoreJob.plan([inputs / "grey.png"], tmp_path / "out", "snow", None, False)
    with pytest.raises(RestoreError, match=r"--task snow: not a task of this model \(trained on"):
        restore_images(resolve_model(str(checkpoint)), job)
    assert not (tmp_path / "out").exists()
    unknown = _cli(inputs, "--model", tmp_path / "nowhere.pt", "--out", tmp_path / "out")
    assert unknown.returncode == 2 and "nowhere.pt" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_a_decompression_bomb_among_the_inputs_is_skipped_and_the_rest_restored(
    checkpoint, inputs, tmp_path
) -> None:
    bomb = bomb_png(inputs / "bomb.png")
    out = tmp_path / "out"
    result = _cli(inputs, "--model", checkpoint, "--out", out, "--tile", "64")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"skipped {bomb}: 14000x13000 is 182.0 MP, over the limit of 50 MP" in result.stderr
    assert "3 restored" in result.stdout and "2 failed" in result.stdout  # bomb, broken.png
    assert not (out / "bomb.png").exists()
    limited = ["--out", tmp_path / "limited", "--max-pixels", "1000"]
    small = _cli(inputs / "grey.png", "--model", checkpoint, *limited)
    assert small.returncode == 1 and "over the limit of 0.001 MP" in small.stderr


def test_a_transparent_input_keeps_its_alpha_and_its_colour_is_restored(
    checkpoint, inputs, tmp_path
) -> None:
    resolved = resolve_model(str(checkpoint))
    job = RestoreJob.plan([inputs / "rgba.png"], tmp_path / "out", "dehaze", None, False)
    (written,) = restore_images(resolved, job).written
    with Image.open(inputs / "rgba.png") as source, Image.open(written) as image:
        assert image.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(image)[..., 3], np.asarray(source)[..., 3])
        colour = np.asarray(source.convert("RGB"), dtype=np.float32) / 255  # straight colour
        restored = np.asarray(image)[..., :3]
    task_id = torch.tensor([resolved.task_names.index("dehaze")])
    with torch.no_grad():
        expected = to_image(resolved.module(to_tensor(colour), task_id))
    np.testing.assert_array_equal(restored, to_uint8(expected))


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_restored_files_and_model_cards_honour_the_umask(
    checkpoint, inputs, tmp_path, umask: int
) -> None:
    out = tmp_path / "out"
    restored = subprocess.run(
        [sys.executable, "-m", "allinone", "restore", str(inputs / "grey.png")]
        + ["--model", str(checkpoint), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(umask),
    )
    assert restored.returncode == 0, restored.stderr[-2000:]
    config = load_pipeline(checkpoint.parents[2] / "restore.yaml").config
    previous = os.umask(umask)
    try:
        card = write_model_card(checkpoint, config)
    finally:
        os.umask(previous)
    for path in (out / "grey.png", card):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_a_sampling_model_restores_with_the_steps_and_seed_asked(checkpoint, tmp_path) -> None:
    """``--sample-steps`` and ``--seed`` reach a diffusion model (perceiver): one seed, one
    image; another seed, another. A one-pass model refuses them in one line."""
    from allinone.models.checkpoint import Checkpoint, save_checkpoint
    from allinone.models.spec import ModelSpec

    spec = ModelSpec("perceiver", "tiny", {}, ("denoise", "dehaze"))
    torch.manual_seed(0)
    perceiver = save_checkpoint(
        tmp_path / "perceiver.pt", Checkpoint(spec, spec.build().training_state_dict())
    )
    photos = tmp_path / "in"
    photos.mkdir()
    photo = Image.open(COLOUR).convert("RGB").crop((0, 0, 45, 37))
    for name in ("a.png", "b.png"):
        photo.save(photos / name)

    def restored(seed: int, out: str) -> dict[str, np.ndarray]:
        done = _cli(photos, "--model", perceiver, "--out", tmp_path / out,
                    "--sample-steps", "2", "--seed", str(seed))  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / out).iterdir())}

    first, other = restored(7, "seven"), restored(8, "eight")
    assert first["a.png"].shape == (37, 45, 3)
    assert np.array_equal(first["a.png"], first["b.png"])  # the same seed for every image
    assert not np.array_equal(first["a.png"], other["a.png"])
    refused = _cli(photos, "--model", checkpoint, "--out", tmp_path / "no", "--seed", "1")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "restores in one pass; --sample-steps and --seed apply to a sampling model" in (
        refused.stderr
    )
