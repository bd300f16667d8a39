"""Reading and writing images as float32 HxWx3 in [0, 1], whatever the file holds.

Real datasets mix grey, RGBA, palette, 16-bit and EXIF-rotated files. Each is converted explicitly
and the conversion is named, so a shard manifest can record what was done to which file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from allinone.base.files import write_atomic_with

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class ImageReadError(ValueError):
    """A file that is not a readable image; the message names the file."""


@dataclass
class LoadedImage:
    pixels: np.ndarray  # float32 HxWx3 in [0, 1]
    conversions: list[str] = field(default_factory=list)  # e.g. ["grey->rgb", "16bit->float"]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_image(path: str | Path) -> LoadedImage:
    """Decode any supported file to RGB float32, recording every conversion applied."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode now: truncated files fail here, not later
            return _to_rgb_float(img)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: cannot decode image ({err})") from None


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode an encoded image (e.g. a shard member) to RGB float32."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_rgb_float(img).pixels
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{name}: cannot decode image ({err})") from None


def _to_rgb_float(img: Image.Image) -> LoadedImage:
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
    return LoadedImage(_to_three_channels(array, conversions), conversions)


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # malformed EXIF blocks must not make a readable image unreadable
        return None


def _to_three_channels(array: np.ndarray, conversions: list[str]) -> np.ndarray:
    if array.ndim == 2:
        conversions.append("grey->rgb")
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.shape[2] == 2:  # grey + alpha
        conversions.append("grey-alpha->rgb")
        array = _composite_on_black(np.repeat(array[..., :1], 3, axis=2), array[..., 1:])
    elif array.shape[2] == 4:
        conversions.append("rgba->rgb")
        array = _composite_on_black(array[..., :3], array[..., 3:])
    return np.ascontiguousarray(np.clip(array, 0.0, 1.0), dtype=np.float32)


def _composite_on_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    # Transparent pixels carry arbitrary colour; premultiplying makes them a defined black.
    return rgb * alpha


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
