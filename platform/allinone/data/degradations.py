"""Degradation ops for synthetic all-in-one restoration data, and the registry that names them.

Every op is a pure function ``fn(image, rng, **params) -> image``: float32 HxWx3 in [0, 1] in and
out, same height and width, all randomness drawn from ``rng``. A sample is therefore reproducible
from ``(seed, key)`` alone (:func:`sample_rng`) and its params record (:func:`apply_chain`).

Each op declares its parameters with their legal bounds (:class:`Param`); task YAMLs give the
training ranges within them, and :func:`check_param` validates those at the config edge.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

# scipy is imported where a filter runs: this module is imported wherever a pipeline is loaded
# (every Ray Train controller and worker, every command), and scipy.signal alone takes 0.5 s.

Number = float | int
BICUBIC = Image.Resampling.BICUBIC


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Param:
    """One parameter of an op and its legal values (bounds inclusive)."""

    name: str
    low: float
    high: float
    integer: bool = False
    odd: bool = False  # an odd integer (kernels need a centre pixel)
    default: float | None = None  # None: the spec must give it


@dataclass(frozen=True)
class Op:
    name: str
    fn: Callable[..., np.ndarray]
    params: tuple[Param, ...]
    description: str
    # The degradation has a direction in the picture (rain falls): training must not turn its
    # samples by 90 degrees (see TaskConfig.turns_in_training).
    upright: bool = False


OPS: dict[str, Op] = {}


def register_op(
    name: str, params: Sequence[Param] = (), description: str = "", upright: bool = False
) -> Callable[[Callable[..., np.ndarray]], Callable[..., np.ndarray]]:
    def register(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        if name in OPS:
            raise ValueError(f"degradation op {name!r} is registered twice")
        OPS[name] = Op(name, fn, tuple(params), description, upright)
        return fn

    return register


def get_op(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        known = ", ".join(sorted(OPS))
        raise ValueError(f"unknown degradation op {name!r} (known: {known})") from None


# --------------------------------------------------------------------------- parameter checks
def check_param(op: Op, name: str, value: object) -> str | None:
    """None when ``value`` (a number or a ``[low, high]`` range) is legal, else a short reason."""
    param = next((p for p in op.params if p.name == name), None)
    if param is None:
        known = ", ".join(p.name for p in op.params) or "none"
        return f"unknown parameter {name!r} (known: {known})"
    if isinstance(value, list | tuple):
        return _check_range(param, value)
    return _check_number(param, value)


def _check_number(param: Param, value: object) -> str | None:
    if not _is_number(value):
        return f"must be a number or a [low, high] range, got {value!r}"
    integral = float(value).is_integer()
    odd = integral and int(value) % 2 == 1
    if (
        not param.low <= value <= param.high
        or (param.integer and not integral)
        or (param.odd and not odd)
    ):
        return f"must be {_describe(param)}, got {_fmt(value)}"
    return None


def _check_range(param: Param, value: list | tuple) -> str | None:
    if len(value) != 2 or not all(_is_number(v) for v in value):
        return f"a range must be two numbers [low, high], got {list(value)!r}"
    low, high = value
    text = f"[{_fmt(low)}, {_fmt(high)}]"
    if low > high:
        return f"range {text} is inverted"
    # Range ends need not be odd: odd params are sampled among the odd integers inside.
    as_ends = Param(param.name, param.low, param.high, integer=param.integer)
    for end in value:
        problem = _check_number(as_ends, end)
        if problem:
            return f"range {text}: {problem}"
    first_odd, last_odd = _odd_bounds(low, high)
    if param.odd and first_odd > last_odd:
        return f"range {text} contains no odd integer"
    return None


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `sigma: true` in a YAML is a mistake, not 1.
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool | np.bool_)
        and math.isfinite(value)
    )


def _describe(param: Param) -> str:
    kind = "an odd integer" if param.odd else "an integer" if param.integer else "a number"
    return f"{kind} in [{_fmt(param.low)}, {_fmt(param.high)}]"


def _fmt(value: Number) -> str:
    return f"{float(value):g}"


def _odd_bounds(low: float, high: float) -> tuple[int, int]:
    """The smallest and largest odd integers in [low, high] (first > second when there is none)."""
    first, last = math.ceil(low), math.floor(high)
    return first + (first % 2 == 0), last - (last % 2 == 0)


# --------------------------------------------------------------------------- sampling, chains
def sample_params(
    op: Op, spec: Mapping[str, Number | Sequence[Number]], rng: np.random.Generator
) -> dict[str, Number]:
    """Fix every parameter of ``op``: a scalar as given, a range drawn uniformly, else the default.

    Draws happen in the op's declared parameter order, so a given rng state gives the same params
    whatever order the spec's keys were written in.
    """
    for name, value in spec.items():
        problem = check_param(op, name, value)
        if problem:
            raise ValueError(f"{op.name}.{name}: {problem}")
    params: dict[str, Number] = {}
    for param in op.params:
        value = spec.get(param.name, param.default)
        if value is None:
            raise ValueError(f"{op.name}: parameter {param.name!r} is required")
        if isinstance(value, list | tuple):
            value = _draw(param, float(value[0]), float(value[1]), rng)
        params[param.name] = int(value) if param.integer or param.odd else float(value)
    return params


def _draw(param: Param, low: float, high: float, rng: np.random.Generator) -> Number:
    if param.odd:
        first, last = _odd_bounds(low, high)
        return first + 2 * int(rng.integers(0, (last - first) // 2, endpoint=True))
    if param.integer:
        return int(rng.integers(math.ceil(low), math.floor(high), endpoint=True))
    return float(rng.uniform(low, high))


def apply_chain(
    image: np.ndarray, chain: Sequence[tuple[str, Mapping]], rng: np.random.Generator
) -> tuple[np.ndarray, list[dict]]:
    """Apply ops in order; return the degraded image and each op's params as used (JSON-ready)."""
    image = _check_image(image)
    record: list[dict] = []
    for name, spec in chain:
        op = get_op(name)
        params = sample_params(op, spec, rng)
        image = op.fn(image, rng, **params)
        record.append({"op": name, **params})
    return image, record


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """The generator for one sample: stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    return np.ascontiguousarray(image, dtype=np.float32)


# --------------------------------------------------------------------------- shared helpers
def _as_image(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(pixels, 0.0, 1.0), dtype=np.float32)


def _count_for_area(per_256x256: float, h: int, w: int) -> int:
    # Densities are per 256x256 so a crop and its full image look equally degraded.
    return round(per_256x256 * h * w / (256 * 256))


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    """Unnormalised Gaussian taps (centre tap 1) over ``size`` pixels."""
    x = np.arange(size) - (size - 1) / 2
    return np.exp(-(x**2) / (2 * sigma**2))


def _separable(image: np.ndarray, taps: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    # scipy's "reflect" repeats the edge pixel (d c b a | a b c d), like OpenCV's BORDER_REFLECT.
    out = ndimage.correlate1d(image, taps, axis=0, mode="reflect")
    return ndimage.correlate1d(out, taps, axis=1, mode="reflect")


def _accumulate(
    ys: np.ndarray, xs: np.ndarray, weights: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Sum weights into integer pixel positions; positions outside the grid are dropped."""
    h, w = shape
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    flat = ys[inside] * w + xs[inside]
    return np.bincount(flat, weights=weights[inside], minlength=h * w).reshape(h, w)


def _splat(
    ys: np.ndarray, xs: np.ndarray, weights: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Bilinear splatting of sub-pixel points: anti-aliased lines and dots without a rasteriser."""
    y0, x0 = np.floor(ys), np.floor(xs)
    fy, fx = ys - y0, xs - x0
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    out = np.zeros(shape)
    for dy, dx, share in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        out += _accumulate(y0 + dy, x0 + dx, weights * share, shape)
    return out


def _line_points(
    length: np.ndarray | float, angle_deg: float, samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (dy, dx) of ``samples`` points along centred segments; angle 0 = horizontal, CCW."""
    t = np.linspace(-0.5, 0.5, samples) * (np.asarray(length, dtype=float)[..., None] - 1)
    theta = np.deg2rad(angle_deg)
    return -np.sin(theta) * t, np.cos(theta) * t  # image rows grow downwards


def _line_kernel(length: int, angle_deg: float) -> np.ndarray:
    """A normalised, anti-aliased line of ``length`` pixels in an odd-sized square."""
    size = length + (length % 2 == 0)
    samples = 4 * length + 1  # 4 per pixel: dense enough that bilinear splats leave no gaps
    dy, dx = _line_points(length, angle_deg, samples)
    centre = (size - 1) / 2
    kernel = _splat(dy.ravel() + centre, dx.ravel() + centre, np.ones(samples), (size, size))
    return kernel / kernel.sum()


def _convolve_reflect(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D convolution of each channel, through the FFT: direct is too slow for 51x51 kernels."""
    from scipy import signal

    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(image, ((ph, ph), (pw, pw), (0, 0)), mode="symmetric")
    return signal.fftconvolve(padded, kernel[..., None], mode="valid", axes=(0, 1))


def _screen(image: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Screen blend of a grey light layer (rain, snow): brightens, never exceeds 1."""
    return image + (1.0 - image) * np.clip(layer, 0.0, 1.0)[..., None]


# --------------------------------------------------------------------------- resolution, blur
@register_op(
    "bicubic_sr",
    params=(Param("scale", 2, 8, integer=True, default=4),),
    description="bicubic downsampling by `scale`, then bicubic upsampling back to the input size",
)
def bicubic_sr(image: np.ndarray, rng: np.random.Generator, *, scale: int) -> np.ndarray:
    h, w = image.shape[:2]
    small = (max(1, math.ceil(w / scale)), max(1, math.ceil(h / scale)))  # ceil as MATLAB imresize
    channels = []
    for c in range(3):
        # PIL's float mode keeps full precision; its resize widens the kernel when shrinking,
        # which is the antialiased bicubic that SR benchmarks (MATLAB imresize) use.
        plane = Image.fromarray(np.ascontiguousarray(image[..., c]))
        plane = plane.resize(small, BICUBIC).resize((w, h), BICUBIC)
        channels.append(np.asarray(plane))
    return _as_image(np.stack(channels, axis=-1))


@register_op(
    "gaussian_blur",
    params=(
        Param("kernel", 3, 51, integer=True, odd=True, default=15),
        Param("sigma", 0.1, 10, default=2),
    ),
    description="isotropic Gaussian blur, kernel x kernel taps, reflect padding",
)
def gaussian_blur(
    image: np.ndarray, rng: np.random.Generator, *, kernel: int, sigma: float
) -> np.ndarray:
    taps = _gaussian_1d(kernel, sigma)
    return _as_image(_separable(image, taps / taps.sum()))


@register_op(
    "motion_blur",
    params=(
        Param("length", 3, 51, integer=True, default=15),
        Param("angle", 0, 180, default=0),
    ),
    description="motion blur along a line of `length` pixels at `angle` degrees (0 = horizontal)",
)
def motion_blur(
    image: np.ndarray, rng: np.random.Generator, *, length: int, angle: float
) -> np.ndarray:
    return _as_image(_convolve_reflect(image, _line_kernel(length, angle)))


# --------------------------------------------------------------------------- noise, compression
@register_op(
    "gaussian_noise",
    params=(Param("sigma", 0, 255, default=25),),
    description="additive white Gaussian noise, sigma on the 0-255 scale, not quantised",
)
def gaussian_noise(image: np.ndarray, rng: np.random.Generator, *, sigma: float) -> np.ndarray:
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma / 255.0)
    return _as_image(image + noise)


@register_op(
    "poisson_noise",
    params=(Param("peak", 1, 1000, default=30),),
    description="shot noise: photon counts Poisson(image * peak) / peak; lower peak = noisier",
)
def poisson_noise(image: np.ndarray, rng: np.random.Generator, *, peak: float) -> np.ndarray:
    return _as_image(rng.poisson(image * peak) / peak)


@register_op(
    "speckle_noise",
    params=(Param("sigma", 0, 1, default=0.1),),
    description="multiplicative noise: image + image * N(0, sigma)",
)
def speckle_noise(image: np.ndarray, rng: np.random.Generator, *, sigma: float) -> np.ndarray:
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return _as_image(image + image * noise)


@register_op(
    "salt_pepper",
    params=(Param("amount", 0, 0.5, default=0.05),),
    description="a fraction `amount` of pixels set to black or white (half each)",
)
def salt_pepper(image: np.ndarray, rng: np.random.Generator, *, amount: float) -> np.ndarray:
    u = rng.random(image.shape[:2])
    out = image.copy()
    out[u < amount / 2] = 0.0
    out[(u >= amount / 2) & (u < amount)] = 1.0
    return out


@register_op(
    "jpeg",
    params=(Param("quality", 1, 100, integer=True, default=50),),
    description="PIL JPEG round trip at `quality`, 4:2:0 chroma subsampling",
)
def jpeg(image: np.ndarray, rng: np.random.Generator, *, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    rgb8 = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(rgb8).save(buffer, format="JPEG", quality=int(quality), subsampling="4:2:0")
    with Image.open(buffer) as decoded:
        return _as_image(np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0)


# --------------------------------------------------------------------------- weather, light
@register_op(
    "rain",
    params=(
        Param("density", 1, 1000, default=75),
        Param("length", 3, 80, integer=True, default=20),
        Param("angle", -60, 60, default=10),
        Param("brightness", 0, 1, default=0.8),
        Param("width", 0, 3, default=0.0),
    ),
    description="anti-aliased rain streaks, `density` per 256x256, `angle` from vertical, "
    "softened across by a Gaussian of sigma `width` px (0: one-pixel lines)",
    upright=True,
)
def rain(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    density: float,
    length: int,
    angle: float,
    brightness: float,
    width: float = 0.0,
) -> np.ndarray:
    h, w = image.shape[:2]
    # One draw of n rows: a lower density's streaks are a prefix of a higher one's (same rng state),
    # so more density never removes a streak.
    u = rng.random((_count_for_area(density, h, w), 4))  # centre y, centre x, intensity, length
    margin = length / 2  # centres just outside too, so borders get as many streaks as the middle
    cy = u[:, 0] * (h + 2 * margin) - margin
    cx = u[:, 1] * (w + 2 * margin) - margin
    lengths = length * (0.75 + 0.5 * u[:, 3])
    samples = 3 * length + 1  # over 2 per pixel even on the longest streak: no gaps after splatting
    dy, dx = _line_points(lengths, 90.0 - angle, samples)
    ys, xs = (cy[:, None] + dy).ravel(), (cx[:, None] + dx).ravel()
    # Each point carries 1/(points per pixel) so a streak is `intensity` bright along its length.
    per_pixel = (samples - 1) / (lengths - 1)
    weights = np.repeat(brightness * (0.5 + 0.5 * u[:, 2]) / per_pixel, samples)
    layer = _splat(ys, xs, weights, (h, w))
    if width > 0:
        # Normalised: the rain's total light stays, spread over a wider, fainter streak.
        taps = _gaussian_1d(2 * math.ceil(3 * width) + 1, width)
        layer = _separable(layer, taps / taps.sum())
    return _as_image(_screen(image, layer))


@register_op(
    "snow",
    params=(Param("density", 1, 1000, default=50), Param("size", 1, 8, default=2)),
    description="soft white flakes, `density` per 256x256, radius `size` px (x0.5, x1, x1.5)",
)
def snow(image: np.ndarray, rng: np.random.Generator, *, density: float, size: float) -> np.ndarray:
    h, w = image.shape[:2]
    u = rng.random((_count_for_area(density, h, w), 4))  # y, x, opacity, size class
    size_class = np.minimum((u[:, 3] * 3).astype(int), 2)
    layer = np.zeros((h, w))
    # Flakes of one size class share one blur, so cost does not grow with the number of flakes.
    for cls, radius in enumerate((0.5 * size, size, 1.5 * size)):
        pick = size_class == cls
        dots = _splat(u[pick, 0] * h, u[pick, 1] * w, 0.6 + 0.4 * u[pick, 2], (h, w))
        sigma = radius / 2
        taps = _gaussian_1d(2 * math.ceil(3 * sigma) + 1, sigma)  # centre tap 1: peak = opacity
        layer += _separable(dots, taps)
    return _as_image(_screen(image, layer))


def depth_proxy(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth stand-in depth map in [0, 1] for images without one.

    Far at the top and near at the bottom, as in most outdoor photos, plus a low-frequency random
    field so the haze is not a pure vertical gradient.
    """
    rows = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None]
    coarse = Image.fromarray(rng.random((4, 4), dtype=np.float32))
    field = np.asarray(coarse.resize((w, h), BICUBIC))
    depth = 0.7 * rows + 0.3 * field
    span = float(depth.max() - depth.min())
    if span == 0.0:
        return np.zeros((h, w), dtype=np.float32)
    return ((depth - depth.min()) / span).astype(np.float32)


@register_op(
    "haze",
    params=(Param("A", 0.5, 1.0, default=0.9), Param("beta", 0.01, 5, default=1.5)),
    description="atmospheric scattering I = J*t + A*(1-t), t = exp(-beta*d), d a depth proxy",
)
def haze(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    A: float,  # capital, as the airlight is named in the scattering model
    beta: float,
    depth: np.ndarray | None = None,
) -> np.ndarray:
    h, w = image.shape[:2]
    if depth is None:
        depth = depth_proxy(h, w, rng)
    elif depth.shape != (h, w):
        raise ValueError(f"depth must be {h}x{w} like the image, got shape {depth.shape}")
    t = np.exp(-beta * depth.astype(np.float32))[..., None]
    return _as_image(image * t + np.float32(A) * (1.0 - t))


@register_op(
    "lowlight",
    params=(Param("factor", 1, 10, default=2), Param("gamma", 0.5, 3, default=1.0)),
    description="darkening: image ** gamma / factor (gamma 1: the mean drops by `factor`)",
)
def lowlight(
    image: np.ndarray, rng: np.random.Generator, *, factor: float, gamma: float
) -> np.ndarray:
    return _as_image(np.power(image, np.float32(gamma)) / np.float32(factor))
