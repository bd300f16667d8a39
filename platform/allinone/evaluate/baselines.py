"""Classical restoration baselines, scored by the same evaluation code as the networks.

A learned model's PSNR means little without the floor it has to beat: the degraded input itself
("input") and the classical method for its task. Each baseline is a pure function from a float
HxWx3 image in [0, 1] to a restored image of the same shape, needing no training and no weights.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.ndimage import minimum_filter, uniform_filter
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

Baseline = Callable[[np.ndarray], np.ndarray]


def identity(img: np.ndarray) -> np.ndarray:
    """The degraded input, unchanged: the score any method must beat."""
    return np.asarray(img, dtype=np.float32)


def tv_denoise(img: np.ndarray, weight: float = 0.08) -> np.ndarray:
    """Total-variation denoising (Chambolle's projection), channels denoised jointly."""
    out = denoise_tv_chambolle(img, weight=weight, channel_axis=-1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def estimate_noise_sigma(img: np.ndarray) -> float:
    """Gaussian noise level from the finest diagonal Haar wavelet band (Donoho's MAD estimator).

    The diagonal detail of each 2x2 block, (a - b - c + d) / 2, cancels smooth image content and
    keeps unit-variance-scaled noise; its median absolute value / 0.6745 is robust to the edges
    that survive. (scikit-image's ``estimate_sigma`` does the same with PyWavelets, which is not
    a dependency here.) Averaged over channels.
    """
    h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
    x = np.asarray(img[:h, :w], dtype=np.float64)
    diagonal = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2.0
    return float(np.mean(np.median(np.abs(diagonal), axis=(0, 1)) / 0.6745))


def nlm_denoise(img: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """Non-local means with the noise level estimated from the image when not given.

    h = 0.8 * sigma with ``fast_mode`` is scikit-image's recommended setting for Gaussian noise;
    passing sigma lets it subtract the expected noise from patch distances.
    """
    if sigma is None:
        sigma = estimate_noise_sigma(img)
    out = denoise_nl_means(
        img,
        h=0.8 * sigma,
        sigma=sigma,
        fast_mode=True,
        patch_size=5,
        patch_distance=6,
        channel_axis=-1,
    )
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# --- dark channel prior dehazing (He, Sun and Tang, CVPR 2009 / TPAMI 2011) --------------------


def dark_channel(img: np.ndarray, patch: int = 15) -> np.ndarray:
    """Per-pixel minimum over colour channels and a patch x patch neighbourhood."""
    return minimum_filter(img.min(axis=2), size=patch, mode="nearest")


def atmospheric_light(img: np.ndarray, dark: np.ndarray, fraction: float = 0.001) -> np.ndarray:
    """Colour of the haze: among the most hazy pixels (top ``fraction`` of the dark channel),
    the one brightest in the input. Picking by the dark channel rather than by brightness alone
    keeps white objects from being mistaken for the sky."""
    count = max(1, int(round(dark.size * fraction)))
    candidates = np.argpartition(dark.ravel(), -count)[-count:]
    pixels = img.reshape(-1, 3)[candidates]
    return pixels[np.argmax(pixels.sum(axis=1))].astype(np.float64)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a grey guide: edge-preserving smoothing of ``src``.

    Locally src ~ a * guide + b; box means of a and b give the output. It snaps the blocky
    patch-wise transmission to the image's edges at linear cost.
    """
    size = 2 * radius + 1

    def box(x: np.ndarray) -> np.ndarray:
        return uniform_filter(x, size=size, mode="reflect")

    mean_g, mean_s = box(guide), box(src)
    var_g = box(guide * guide) - mean_g * mean_g
    cov_gs = box(guide * src) - mean_g * mean_s
    a = cov_gs / (var_g + eps)
    b = mean_s - a * mean_g
    return box(a) * guide + box(b)


def dark_channel_dehaze(
    img: np.ndarray,
    patch: int = 15,
    omega: float = 0.95,
    t0: float = 0.1,
    guide_radius: int = 60,
    guide_eps: float = 1e-4,
) -> np.ndarray:
    """Invert I = J t + A (1 - t) with t estimated from the dark channel prior.

    ``omega`` < 1 keeps a little haze for depth perception; ``t0`` bounds the division so dense
    haze regions do not blow up noise. Guided-filter settings are the paper's (r 60, eps 1e-4).
    """
    img = np.asarray(img, dtype=np.float64)
    light = atmospheric_light(img, dark_channel(img, patch))
    coarse = 1.0 - omega * dark_channel(img / np.maximum(light, 1e-6), patch)
    grey = img @ np.array([0.299, 0.587, 0.114])
    transmission = guided_filter(grey, coarse, guide_radius, guide_eps)
    t = np.maximum(transmission, t0)[..., None]
    restored = (img - light) / t + light
    return np.clip(restored, 0.0, 1.0).astype(np.float32)


# --- registry --------------------------------------------------------------------------------

BASELINES: dict[str, Baseline] = {
    "input": identity,
    "tv": tv_denoise,
    "nlm": nlm_denoise,
    "dark_channel": dark_channel_dehaze,
}

# The classical method(s) each task is compared against, besides its degraded input.
BASELINES_FOR_TASK: dict[str, list[str]] = {
    "sr": ["input"],
    "deblur": ["input"],
    "denoise": ["input", "tv", "nlm"],
    "jpeg": ["input"],
    "derain": ["input"],
    "dehaze": ["input", "dark_channel"],
    "lowlight": ["input"],
    # Real-pair and unseen tasks whose degradation a classical method addresses.
    "sots": ["input", "dark_channel"],
    "poisson_noise": ["input", "tv", "nlm"],
    "noise_jpeg": ["input", "tv", "nlm"],
    "haze_noise": ["input", "dark_channel"],
}


def baselines_for(task: str) -> list[str]:
    """Baseline names for a task; an unlisted (e.g. zero-shot) task is compared with its input."""
    return BASELINES_FOR_TASK.get(task, ["input"])
