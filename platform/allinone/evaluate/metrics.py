"""Image quality metrics and whole-image inference, shared by every evaluation.

PSNR and SSIM follow the conventions restoration papers report (and BasicSR computes): optional
border crop, optional evaluation on the BT.601 luma (Y) channel, and Wang et al.'s SSIM with an
11x11 Gaussian window (sigma 1.5) averaged over the valid region. Images are float HxWx3 arrays in
[0, data_range]; scores are plain Python floats so they log and serialise without fuss.

``restore_tiled`` runs a model over an image too large for memory in overlapping tiles and blends
them with ramp windows, so a test image of any size is restored with bounded memory and no seams.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

# Identical images have infinite PSNR; a finite cap keeps means and logged metrics finite.
# 100 dB is far above anything a restoration model reaches (8-bit rounding alone costs ~59 dB).
PSNR_CAP_DB = 100.0

# ITU-R BT.601 luma as MATLAB's rgb2ycbcr computes it, on RGB in [0, 1]: Y lies in [16, 235] / 255.
_Y_OFFSET = 16.0 / 255.0
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0


def rgb_to_y(img: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """BT.601 luma (HxW) of an RGB image in [0, data_range], in the same range units."""
    unit = np.asarray(img, dtype=np.float64) / data_range
    return (unit @ _Y_WEIGHTS + _Y_OFFSET) * data_range


def _prepare(
    pred: np.ndarray, target: np.ndarray, data_range: float, crop_border: int, y_channel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64, cropped and (optionally) reduced to Y, after checking shapes."""
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs target {target.shape}")
    if pred.ndim != 3 or pred.shape[2] != 3:
        raise ValueError(f"expected HxWx3 images, got {pred.shape}")
    if crop_border < 0 or 2 * crop_border >= min(pred.shape[:2]):
        raise ValueError(f"crop_border {crop_border} leaves nothing of a {pred.shape[:2]} image")
    a = np.asarray(pred, dtype=np.float64)
    b = np.asarray(target, dtype=np.float64)
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        a, b = rgb_to_y(a, data_range), rgb_to_y(b, data_range)
    return a, b


def psnr(
    pred: np.ndarray,
    target: np.ndarray,
    data_range: float = 1.0,
    crop_border: int = 0,
    y_channel: bool = False,
) -> float:
    """Peak signal-to-noise ratio in dB, capped at ``PSNR_CAP_DB`` for identical images."""
    a, b = _prepare(pred, target, data_range, crop_border, y_channel)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * float(np.log10(data_range**2 / mse)))


def ssim(
    pred: np.ndarray,
    target: np.ndarray,
    data_range: float = 1.0,
    crop_border: int = 0,
    y_channel: bool = False,
) -> float:
    """Structural similarity (Wang et al. 2004): Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03.

    scikit-image with these options filters with the normalised Gaussian, uses population (not
    sample) covariances, and averages SSIM over the pixels whose window lies inside the image,
    which is the reference MATLAB ``ssim_index`` ("valid" filtering). RGB: the mean over channels.
    """
    from skimage.metrics import structural_similarity  # 1 s to import: only when scoring

    a, b = _prepare(pred, target, data_range, crop_border, y_channel)
    return float(
        structural_similarity(
            a,
            b,
            data_range=data_range,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=None if y_channel else -1,
        )
    )


def to_tensor(img: np.ndarray) -> Tensor:
    """HxWx3 float image -> (1, 3, H, W) float32 tensor."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got {img.shape}")
    chw = np.ascontiguousarray(np.transpose(img, (2, 0, 1)), dtype=np.float32)
    return torch.from_numpy(chw).unsqueeze(0)


def to_image(t: Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) tensor -> HxWx3 float32 numpy image clipped to [0, 1]."""
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ValueError(f"to_image takes one image, got a batch of {t.shape[0]}")
        t = t[0]
    chw = t.detach().to("cpu", torch.float32).clamp(0.0, 1.0).numpy()
    return np.ascontiguousarray(np.transpose(chw, (1, 2, 0)))


# --- tiled inference -------------------------------------------------------------------------


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis: every ``stride``, plus one flush with the far edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _edge_ramp(tile: int, overlap: int, ramp_in: bool, ramp_out: bool) -> Tensor:
    """1-D blending weights for one tile.

    At an edge shared with a neighbour, the weight is 0 over the first quarter of the overlap
    (those pixels saw the tile's artificial border, e.g. zero padding, through the receptive
    field), rises linearly across the middle half and is 1 beyond. The rising ramp of one tile
    and the falling ramp of its neighbour sum to 1 where they overlap by exactly ``overlap``; at
    an image border the weight stays 1 because no other tile covers those pixels.
    """
    weight = torch.ones(tile, dtype=torch.float32)
    margin = overlap // 4
    width = overlap - 2 * margin + 1
    ramp = ((torch.arange(overlap, dtype=torch.float32) + 1 - margin) / width).clamp(0.0, 1.0)
    if ramp_in:
        weight[:overlap] = ramp
    if ramp_out:
        weight[tile - overlap :] = ramp.flip(0)
    return weight


def _axis_plan(length: int, tile: int, overlap: int) -> list[tuple[int, Tensor]]:
    """(start, weights) for each tile along one axis."""
    size = min(tile, length)
    starts = tile_starts(length, size, size - overlap)
    last = len(starts) - 1
    return [
        (start, _edge_ramp(size, overlap, ramp_in=i > 0, ramp_out=i < last))
        for i, start in enumerate(starts)
    ]


# 32 px hides the seams of the models we have; a smaller tile gets half its size, so every
# tile size a user may pass has a valid default.
DEFAULT_OVERLAP = 32


def default_overlap(tile: int) -> int:
    """The overlap of ``tile``-sized tiles when none is given: always smaller than the tile."""
    return min(DEFAULT_OVERLAP, tile // 2)


def restore_tiled(
    model: Callable[..., Tensor],
    image: Tensor,
    tile: int | None,
    overlap: int | None = None,
    task_id: Tensor | None = None,
) -> Tensor:
    """Restore an (N, 3, H, W) batch, in overlapping ``tile`` x ``tile`` windows if it is larger.

    The model is called as ``model(x)`` or, given a task id, ``model(x, task_id)``. Runs under
    ``torch.no_grad``: keeping every tile's graph would defeat the point of tiling. For a model
    whose receptive field reaches at most ``overlap // 4`` pixels, the tiled result equals the
    whole-image result up to float rounding. ``overlap`` defaults to :func:`default_overlap`.
    """
    height, width = image.shape[-2:]
    with torch.no_grad():
        if tile is None or (height <= tile and width <= tile):
            return _call(model, image, task_id)
        overlap = default_overlap(tile) if overlap is None else overlap
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
        return _blend_tiles(model, image, tile, overlap, task_id)


def _call(model: Callable[..., Tensor], x: Tensor, task_id: Tensor | None) -> Tensor:
    return model(x) if task_id is None else model(x, task_id)


def _blend_tiles(
    model: Callable[..., Tensor], image: Tensor, tile: int, overlap: int, task_id: Tensor | None
) -> Tensor:
    height, width = image.shape[-2:]
    # Accumulate in float32 whatever the model's dtype, so many small blended terms keep precision.
    total = torch.zeros(image.shape, dtype=torch.float32, device=image.device)
    weight_sum = torch.zeros((1, 1, height, width), dtype=torch.float32, device=image.device)
    for top, row_w in _axis_plan(height, tile, overlap):
        for left, col_w in _axis_plan(width, tile, overlap):
            rows = slice(top, top + row_w.numel())
            cols = slice(left, left + col_w.numel())
            restored = _call(model, image[..., rows, cols], task_id).float()
            w = (row_w[:, None] * col_w[None, :]).to(image.device)
            total[..., rows, cols] += restored * w
            weight_sum[..., rows, cols] += w
    return (total / weight_sum).to(image.dtype)
