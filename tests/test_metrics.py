from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from torch import nn

from allinone.evaluate.metrics import (
    PSNR_CAP_DB,
    default_overlap,
    psnr,
    restore_tiled,
    rgb_to_y,
    ssim,
    to_image,
    to_tensor,
)
from allinone.evaluate.scoring import model_restorer


def _random_image(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


# --- PSNR ------------------------------------------------------------------------------------


def test_psnr_of_a_constant_offset_is_exact() -> None:
    target = np.full((16, 16, 3), 0.5, dtype=np.float32)
    # MSE = 0.1^2 = 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB.
    assert psnr(target + 0.1, target) == pytest.approx(20.0, abs=1e-4)
    # The same perturbation on the 0-255 scale is the same PSNR.
    assert psnr((target + 0.1) * 255, target * 255, data_range=255.0) == pytest.approx(20.0, 1e-4)


def test_psnr_of_a_sparse_perturbation() -> None:
    target = _random_image()
    pred = target.copy()
    pred[::4, ::4, 0] += 0.2  # 1/16 of rows x cols, one of 3 channels
    mse = 0.2**2 / 16 / 3
    assert psnr(pred, target) == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)


def test_identical_images_hit_the_cap() -> None:
    img = _random_image()
    assert psnr(img, img) == PSNR_CAP_DB
    assert psnr(img, img, y_channel=True) == PSNR_CAP_DB


def test_metrics_are_symmetric() -> None:
    a, b = _random_image(seed=1), _random_image(seed=2)
    assert psnr(a, b) == psnr(b, a)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    assert ssim(a, b, y_channel=True) == pytest.approx(ssim(b, a, y_channel=True), abs=1e-12)


def test_crop_border_ignores_the_border() -> None:
    target = _random_image(32, 32)
    pred = target.copy()
    pred[:4] += 0.1  # a 4-pixel band along the top edge
    assert psnr(pred, target, crop_border=4) == PSNR_CAP_DB
    mse = 0.1**2 * (4 * 32) / (32 * 32)
    assert psnr(pred, target) == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)
    assert ssim(pred, target, crop_border=4) == pytest.approx(1.0)
    assert ssim(pred, target) < 1.0


def test_y_channel_is_bt601_luma() -> None:
    # MATLAB rgb2ycbcr: black -> 16/255, white -> 235/255.
    assert rgb_to_y(np.zeros((1, 1, 3)))[0, 0] == pytest.approx(16 / 255)
    assert rgb_to_y(np.ones((1, 1, 3)))[0, 0] == pytest.approx(235 / 255)
    target = _random_image()
    pred = target.copy()
    pred[..., 1] += 0.05  # green only: Y moves by 128.553 / 255 * 0.05 everywhere
    y_diff = 128.553 / 255 * 0.05
    assert psnr(pred, target, y_channel=True) == pytest.approx(-20 * math.log10(y_diff), abs=1e-3)
    direct = (
        16 / 255 + (65.481 * pred[..., 0] + 128.553 * pred[..., 1] + 24.966 * pred[..., 2]) / 255
    )
    np.testing.assert_allclose(rgb_to_y(pred), direct, atol=1e-6)


def _reference_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al.'s ssim_index: 11x11 Gaussian (sigma 1.5), 'valid' filtering, mean of the map."""
    ax = np.arange(11) - 5
    g = np.exp(-(ax**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def filt(x: np.ndarray) -> np.ndarray:
        return convolve2d(x, window, mode="valid")

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(ssim_map.mean())


def test_ssim_matches_the_reference_definition() -> None:
    target = _random_image(48, 56, seed=3).astype(np.float64)
    pred = np.clip(target + np.random.default_rng(4).normal(0, 0.05, target.shape), 0, 1)
    per_channel = [_reference_ssim(pred[..., c], target[..., c]) for c in range(3)]
    assert ssim(pred, target) == pytest.approx(np.mean(per_channel), abs=1e-6)
    y_ref = _reference_ssim(rgb_to_y(pred), rgb_to_y(target))
    assert ssim(pred, target, y_channel=True) == pytest.approx(y_ref, abs=1e-6)
    assert ssim(target, target) == pytest.approx(1.0)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(_random_image(8, 8), _random_image(8, 9))


def test_tensor_image_round_trip() -> None:
    img = _random_image(7, 9)
    t = to_tensor(img)
    assert t.shape == (1, 3, 7, 9) and t.dtype == torch.float32
    np.testing.assert_array_equal(to_image(t), img)
    assert to_image(t * 3 - 1).min() == 0.0 and to_image(t * 3 - 1).max() == 1.0


# --- tiled inference -------------------------------------------------------------------------


class TaskConvNet(nn.Module):
    """A real conv stack with a per-task bias; counts its calls."""

    def __init__(self, depth: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Conv2d(3, 3, 3, padding=1))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)
        self.task_bias = nn.Parameter(torch.randn(4, 3))
        self.calls = 0

    def forward(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        out = self.body(x)
        if task_id is not None:
            out = out + self.task_bias[task_id][:, :, None, None]
        return out


def _batch(n: int = 1, h: int = 97, w: int = 131) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(5))


def test_tiling_a_local_conv_matches_the_whole_image() -> None:
    model = TaskConvNet(depth=1)
    x = _batch()
    whole = restore_tiled(model, x, tile=None)
    tiled = restore_tiled(model, x, tile=48, overlap=16)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max().item() < 1e-4


def test_tiling_a_deeper_net_with_task_ids() -> None:
    model = TaskConvNet(depth=6, seed=1)  # receptive field reaches 6 pixels
    x = _batch(n=2)
    task = torch.tensor([1, 3])
    whole = restore_tiled(model, x, tile=None, task_id=task)
    # overlap // 4 = 8 >= 6: pixels that saw a tile's zero padding get no weight.
    wide = restore_tiled(model, x, tile=48, overlap=32, task_id=task)
    assert (wide - whole).abs().max().item() < 1e-4
    # overlap // 4 = 2 < 6: padding leaks in, but the blending keeps it far below hard seams.
    narrow = restore_tiled(model, x, tile=48, overlap=8, task_id=task)
    seams = restore_tiled(model, x, tile=48, overlap=0, task_id=task)
    narrow_err = (narrow - whole).abs().max().item()
    assert narrow_err < 5e-3
    assert narrow_err < (seams - whole).abs().max().item() / 10


def test_identity_model_is_reproduced_on_odd_sizes() -> None:
    x = _batch(h=97, w=131)
    out = restore_tiled(nn.Identity(), x, tile=48, overlap=32)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_one_call_when_the_image_fits() -> None:
    model = TaskConvNet(depth=1)
    restore_tiled(model, _batch(h=40, w=40), tile=48)
    restore_tiled(model, _batch(h=97, w=131), tile=None)
    assert model.calls == 2
    restore_tiled(model, _batch(h=97, w=131), tile=48, overlap=16)
    assert model.calls > 2


def test_evaluation_restores_in_tiles_of_32() -> None:
    # The smallest --tile the CLI takes; evaluation once passed a fixed 32 px overlap and crashed.
    model = TaskConvNet(depth=1)
    image = to_image(_batch(h=97, w=131))
    whole = model_restorer(model, tile=None)(image)
    calls = model.calls
    tiled = model_restorer(model, tile=32)(image)
    assert model.calls - calls > 1, "the image must have been restored in tiles"
    np.testing.assert_allclose(tiled, whole, atol=1e-4)


def test_the_default_overlap_fits_every_tile() -> None:
    assert default_overlap(256) == 32
    assert all(0 <= default_overlap(tile) < tile for tile in range(1, 100))


def test_overlap_must_be_smaller_than_the_tile() -> None:
    with pytest.raises(ValueError, match="overlap"):
        restore_tiled(nn.Identity(), _batch(), tile=32, overlap=32)
