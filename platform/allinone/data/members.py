"""How a shard sample's two images are stored, and how the stream decodes them as uint8.

A sample holds its LQ and GT image either as PNGs (``lq.png``, ``gt.png``: small, viewable) or as
raw uint8 HxWx3 arrays in NumPy's ``.npy`` format (``lq.npy``, ``gt.npy``: 1.7x the bytes of a
PNG at compression 1, decoded 40x faster). Both are members a plain ``webdataset`` reader decodes.
An ``.npy`` member is read as data only: its header is parsed without pickle, and anything but
uint8 HxWx3 in C order with exactly the bytes its header promises is refused, naming the member.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import get_args

import numpy as np
from PIL import Image, UnidentifiedImageError

from allinone.config import MemberFormat
from allinone.data.images import ImageReadError, decode_image_bytes, encode_png, to_uint8

MEMBER_FORMATS: tuple[MemberFormat, ...] = get_args(MemberFormat)
EXIF_ORIENTATION = 0x0112
# Public NumPy readers of an .npy header: a dict literal parsed without pickle or eval
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


@dataclass(frozen=True)
class PixelPair:
    """A sample's LQ and GT members as stored, and the format they share."""

    lq: bytes
    gt: bytes
    format: MemberFormat

    def names(self, sample: str) -> tuple[str, str]:
        """The two members' names for messages: ``<sample>.lq.npy``, ``<sample>.gt.npy``."""
        return tuple(f"{sample}.{member}" for member in member_names(self.format))


def encode_member(pixels: np.ndarray, format: MemberFormat) -> bytes:
    """Float [0, 1] pixels as one shard member of ``format``."""
    if format == "png":
        return encode_png(pixels)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(to_uint8(pixels)), allow_pickle=False)
    return buffer.getvalue()


def member_names(format: MemberFormat) -> tuple[str, str]:
    return f"lq.{format}", f"gt.{format}"


def pixel_pair(members: dict[str, bytes], name: str) -> PixelPair:
    """The sample's LQ and GT members, in whichever format it holds both."""
    for format in MEMBER_FORMATS:
        lq, gt = member_names(format)
        if lq in members and gt in members:
            return PixelPair(members[lq], members[gt], format)
    raise ImageReadError(
        f"{name}: holds no LQ/GT pair (lq.png and gt.png, or lq.npy and gt.npy); "
        f"members: {sorted(members)}"
    )


def decode_pair_float(members: dict[str, bytes], name: str) -> tuple[np.ndarray, np.ndarray]:
    """A sample's (LQ, GT) as float32 HxWx3 in [0, 1], as scoring and checks read them; an error
    names ``name`` and the member."""
    pair = pixel_pair(members, name)
    lq_name, gt_name = pair.names(name)
    return (
        decode_member_float(pair.lq, pair.format, lq_name),
        decode_member_float(pair.gt, pair.format, gt_name),
    )


def decode_member(
    data: bytes, format: MemberFormat, name: str, rows: int | None = None
) -> np.ndarray:
    """A member as uint8 HxWx3, or only its first ``rows`` rows where it can stop there."""
    if format == "npy":
        return _npy_rows(data, name, rows)
    return decode_rgb8(data, name, rows)


def decode_member_float(data: bytes, format: MemberFormat, name: str) -> np.ndarray:
    """A member as float32 HxWx3 in [0, 1], as scoring and checks read it."""
    if format == "npy":
        return _npy_rows(data, name, None).astype(np.float32) / 255.0
    return decode_image_bytes(data, name)


def member_size(data: bytes, format: MemberFormat, name: str) -> tuple[int, int]:
    """A member's (height, width), read from its header without decoding it."""
    if format == "npy":
        height, width, _ = _npy_header(data, name)[0]
        return height, width
    return image_size(data, name)


# --------------------------------------------------------------------------- npy
def _npy_header(data: bytes, name: str) -> tuple[tuple[int, int, int], int]:
    """The array's shape and where its pixels start; refuses anything but uint8 HxWx3."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = _NPY_HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f"format version {version} is not read")
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, SyntaxError, TypeError) as err:
        raise ImageReadError(f"{name}: not a NumPy .npy array ({err})") from None
    if dtype != np.uint8 or fortran_order or len(shape) != 3 or shape[2] != 3:
        raise ImageReadError(
            f"{name}: holds {dtype} pixels of shape {shape}"
            f"{' in Fortran order' if fortran_order else ''}; a member must be uint8 HxWx3"
        )
    offset = stream.tell()
    if len(data) - offset != shape[0] * shape[1] * 3:
        raise ImageReadError(
            f"{name}: {len(data) - offset} bytes of pixels where its header says {shape}"
        )
    return shape, offset


def _npy_rows(data: bytes, name: str, rows: int | None) -> np.ndarray:
    (height, width, _), offset = _npy_header(data, name)
    rows = height if rows is None else min(rows, height)
    pixels = np.frombuffer(data, np.uint8, count=rows * width * 3, offset=offset)
    return pixels.reshape(rows, width, 3)


# --------------------------------------------------------------------------- png
def image_size(data: bytes, name: str) -> tuple[int, int]:
    """An image member's (height, width), read from its header without decoding it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.height, image.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        image = decode_rgb8(data, name)  # raises the error that names the member, or decodes
        return image.shape[0], image.shape[1]


def decode_rgb8(data: bytes, name: str, rows: int | None = None) -> np.ndarray:
    """An image member as uint8 HxWx3, or only its first ``rows`` rows where it can stop there.

    Shards hold 8-bit RGB PNGs (``encode_png``): those decode straight to uint8, skipping the float
    image, which cost about 1 of every 6 ms a sample took (benchmarks/data_pipeline.py). Anything
    else takes the general path, whole; both give equal pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode == "RGB" and _upright(image, data):
                if rows is not None and rows < image.height:
                    _stop_after_rows(image, rows)
                return np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        pass  # the general path raises the error that names the member
    return to_uint8(decode_image_bytes(data, name))


def _upright(image: Image.Image, data: bytes) -> bool:
    """No EXIF orientation to apply. A PNG's EXIF chunk (eXIf) may follow its pixels, and Pillow
    decodes the whole image to look for one; a PNG without the chunk's name among its bytes has
    none, and may be decoded in part."""
    if image.format == "PNG" and b"eXIf" not in data:
        return True
    return image.getexif().get(EXIF_ORIENTATION) in (None, 1)


def _stop_after_rows(image: Image.Image, rows: int) -> None:
    """Have Pillow decode a non-interlaced PNG's first ``rows`` rows only: its decoder fills the
    one tile it is given row by row and ignores the data left over. Any other image is left as
    it is, to decode whole."""
    if image.format != "PNG" or image.info.get("interlace") or len(image.tile) != 1:
        return
    (tile,) = image.tile
    if tuple(tile.extents) != (0, 0, image.width, image.height):
        return
    image.tile = [tile._replace(extents=(0, 0, image.width, rows))]
    image._size = (image.width, rows)
