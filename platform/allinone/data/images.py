"""Reading and writing images as float32 HxWx3 in [0, 1], whatever the file holds.

Real datasets mix grey, RGBA, palette, 16-bit and EXIF-rotated files. Each is converted explicitly
and the conversion is named, so a shard manifest can record what was done to which file.
A transparent file is flattened onto white (what a viewer shows it on) for training and scoring;
``restore`` reads its straight colour and alpha instead and puts the alpha back.

Every file's size is read from its header before it is decoded: more than ``max_pixels`` (a
decompression bomb is a few hundred KB that decodes to gigabytes) is refused like any bad file.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from allinone.base.files import write_atomic_with
from allinone.config import DEFAULT_MAX_PIXELS

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class ImageReadError(ValueError):
    """A file that is not a readable image; the message names the file."""


@dataclass
class LoadedImage:
    pixels: np.ndarray  # float32 HxWx3 in [0, 1]; a transparent file's flattened onto white
    conversions: list[str] = field(default_factory=list)  # e.g. ["grey->rgb", "16bit->float"]
    alpha: np.ndarray | None = None  # float32 HxW of a transparent file, read with flatten=False


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, flatten: bool = True
) -> LoadedImage:
    """Decode any supported file to RGB float32, recording every conversion applied. With
    ``flatten=False`` a transparent file keeps its straight colour in ``pixels`` and its alpha."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    return _decode(path, str(path), max_pixels, flatten)


def decode_image_bytes(
    data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode an encoded image (e.g. a shard member) to RGB float32."""
    return _decode(io.BytesIO(data), name, max_pixels, flatten=True).pixels


def _decode(source: Path | IO[bytes], name: str, max_pixels: int, flatten: bool) -> LoadedImage:
    try:
        with _open_checked(source, name, max_pixels) as img:
            img.load()  # force the full decode now: truncated files fail here, not later
            return _to_rgb_float(img, flatten)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{name}: cannot decode image ({err})") from None


def _open_checked(source: Path | IO[bytes], name: str, max_pixels: int) -> Image.Image:
    """Open (read the header only) and refuse more than ``max_pixels`` before any decoding."""
    with _pil_limit_off():
        img = Image.open(source)
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageReadError(
            f"{name}: {width}x{height} is {width * height / 1e6:.1f} MP, over the limit of "
            f"{max_pixels / 1e6:g} MP (--max-pixels); refused before decoding"
        )
    return img


@contextmanager
def _pil_limit_off() -> Iterator[None]:
    # PIL refuses at open above twice its own MAX_IMAGE_PIXELS (179 MP), in its own words, and
    # warns above it: ours, checked right after opening and before any decoding, decides alone.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _to_rgb_float(img: Image.Image, flatten: bool = True) -> LoadedImage:
    conversions: list[str] = []
    if _exif_orientation(img) not in (None, 1):
        img = ImageOps.exif_transpose(img)
        conversions.append("exif-rotated")
    array = np.asarray(img)
    if array.dtype == np.uint16 or img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = array.astype(np.float32) / 65535.0
        conversions.append("16bit->float")
    elif array.dtype == np.bool_:
        array = array.astype(np.float32)
        conversions.append("1bit->float")
    elif img.mode == "P" or img.mode not in ("L", "LA", "RGB", "RGBA"):
        array = np.asarray(img.convert("RGBA")).astype(np.float32) / 255.0
        conversions.append(f"{img.mode.lower()}->rgba")
    else:
        array = array.astype(np.float32) / 255.0
    alpha = None
    if array.ndim == 3 and array.shape[2] in (2, 4):
        array, alpha = array[..., :-1], array[..., -1]
        # A palette converts to RGBA whether or not it has a transparent entry.
        alpha = alpha if "A" in img.mode or "transparency" in img.info else None
    if alpha is not None and flatten:
        array = _flatten_on_white(array, alpha[..., None])
        conversions.append(f"{'grey-alpha' if array.shape[2] == 1 else 'rgba'}->{_ON_WHITE}")
        alpha = None
    return LoadedImage(_to_three_channels(array, conversions), conversions, alpha)


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # malformed EXIF blocks must not make a readable image unreadable
        return None


_ON_WHITE = "rgb on white"


def _to_three_channels(array: np.ndarray, conversions: list[str]) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        conversions.append("grey->rgb")
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(np.clip(array, 0.0, 1.0), dtype=np.float32)


def _flatten_on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    # Transparent pixels carry arbitrary colour; over white they become what a viewer shows.
    # (Over black, as before, half transparency halved the brightness the model learnt from.)
    return colour * alpha + (1.0 - alpha)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG-encode float [0,1] pixels as 8-bit RGB (fast compression: shards are rewritten often)."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(pixels)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def write_image_atomic(pixels: np.ndarray, path: Path) -> None:
    """Write to a temporary file in the same folder and rename, so a crash leaves no half file."""
    suffix = path.suffix.lower()
    fmt = {
        ".jpg": "JPEG",
        ".jpeg": "JPEG",
        ".png": "PNG",
        ".bmp": "BMP",
        ".tif": "TIFF",
        ".tiff": "TIFF",
        ".webp": "WEBP",
    }.get(suffix, "PNG")
    write_atomic_with(path, lambda tmp: Image.fromarray(to_uint8(pixels)).save(tmp, format=fmt))
