"""Where a task's images come from: clean photos to degrade, or real LQ/GT pairs in known layouts.

Layouts of paired datasets, as their authors ship them:
- ``rain100l``: ``rain/rain-001.png`` pairs with ``norain/norain-001.png``;
- ``sots``: ``hazy/0001_0.8_0.2.jpg`` pairs with ``clear/0001.png`` (name up to the first '_';
  the numbers are the airlight and scattering coefficient used to synthesise the haze);
- ``lq_gt``: ``lq/NAME`` pairs with ``gt/NAME`` (same file name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import skimage.data

from allinone.data.images import LoadedImage, is_image_file, read_image

# scikit-image's bundled photographs (shipped in the wheel, so nothing is downloaded). Grey ones
# are kept on purpose: they exercise the grey->RGB path and add texture variety.
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "motorcycle_left",
    "motorcycle_right",
    "rocket",
)


@dataclass(frozen=True)
class SourceItem:
    """One clean image, or one LQ/GT pair, with a key stem that is safe in a WebDataset key."""

    stem: str
    gt: str  # a file path, or "skimage:<name>"
    lq: str | None = None  # paired tasks only
    info: dict[str, float] = field(default_factory=dict)  # e.g. SOTS airlight/beta from the name


@dataclass(frozen=True)
class Refused:
    file: str
    reason: str


class SourceError(ValueError):
    """A source that cannot be used at all (missing folder, unknown layout, no images)."""


def safe_stem(name: str) -> str:
    # WebDataset splits a member name at its first dot: keys must have none.
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def clean_items(source: str | Path) -> list[SourceItem]:
    """Clean images from scikit-image (``"skimage"``) or every image file under a folder."""
    if str(source) == "skimage":
        return [SourceItem(stem=f"skimage_{n}", gt=f"skimage:{n}") for n in SKIMAGE_PHOTOS]
    folder = _existing_folder(source)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise SourceError(f"{folder}: no image files found")
    return [
        SourceItem(stem=safe_stem(str(p.relative_to(folder).with_suffix(""))), gt=str(p))
        for p in files
    ]


def paired_items(root: str | Path, layout: str) -> tuple[list[SourceItem], list[Refused]]:
    """LQ/GT pairs of a dataset in a standard layout; a pair missing a side is refused by name."""
    root = _existing_folder(root)
    pairing = {"rain100l": _rain100l_pairs, "sots": _sots_pairs, "lq_gt": _lq_gt_pairs}
    if layout not in pairing:
        raise SourceError(f"unknown paired layout {layout!r} (known: {sorted(pairing)})")
    items, refused = pairing[layout](root)
    if not items:
        raise SourceError(f"{root}: no {layout} pairs found")
    return items, refused


def _rain100l_pairs(root: Path) -> tuple[list[SourceItem], list[Refused]]:
    lq_dir, gt_dir = _subfolders(root, "rain", "norain")
    return _pair_by_name(lq_dir, gt_dir, lambda lq: f"no{lq.stem}")


def _sots_pairs(root: Path) -> tuple[list[SourceItem], list[Refused]]:
    lq_dir, gt_dir = _subfolders(root, "hazy", "clear")
    items, refused = _pair_by_name(lq_dir, gt_dir, lambda lq: lq.stem.split("_")[0])
    return [_with_sots_params(item) for item in items], refused


def _lq_gt_pairs(root: Path) -> tuple[list[SourceItem], list[Refused]]:
    lq_dir, gt_dir = _subfolders(root, "lq", "gt")
    return _pair_by_name(lq_dir, gt_dir, lambda lq: lq.stem)


def _pair_by_name(lq_dir: Path, gt_dir: Path, gt_stem_of) -> tuple[list[SourceItem], list[Refused]]:
    gts = {p.stem: p for p in sorted(gt_dir.iterdir()) if is_image_file(p)}
    items, refused, used = [], [], set()
    for lq in sorted(p for p in lq_dir.iterdir() if is_image_file(p)):
        gt = gts.get(gt_stem_of(lq))
        if gt is None:
            refused.append(Refused(str(lq), f"no ground truth '{gt_stem_of(lq)}.*' in {gt_dir}"))
            continue
        used.add(gt.stem)
        items.append(SourceItem(stem=safe_stem(lq.stem), gt=str(gt), lq=str(lq)))
    refused += [
        Refused(str(p), f"no degraded counterpart in {lq_dir}")
        for stem, p in gts.items()
        if stem not in used
    ]
    return items, refused


def _with_sots_params(item: SourceItem) -> SourceItem:
    parts = Path(item.lq or "").stem.split("_")
    try:
        info = {"airlight": float(parts[1]), "beta": float(parts[2])}
    except (IndexError, ValueError):
        info = {}
    return SourceItem(item.stem, item.gt, item.lq, info)


def _subfolders(root: Path, lq: str, gt: str) -> tuple[Path, Path]:
    missing = [name for name in (lq, gt) if not (root / name).is_dir()]
    if missing:
        raise SourceError(f"{root}: expected sub-folders '{lq}/' and '{gt}/', missing: {missing}")
    return root / lq, root / gt


def _existing_folder(source: str | Path) -> Path:
    folder = Path(source)
    if not folder.is_dir():
        raise SourceError(f"{folder}: data folder does not exist")
    return folder


def load_clean(ref: str) -> LoadedImage:
    """Load a clean image given as a path or ``skimage:<name>``."""
    if not ref.startswith("skimage:"):
        return read_image(ref)
    name = ref.removeprefix("skimage:")
    if name in ("motorcycle_left", "motorcycle_right"):
        pixels = skimage.data.stereo_motorcycle()[0 if name.endswith("left") else 1]
    else:
        pixels = getattr(skimage.data, name)()
    conversions = []
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
        conversions.append("grey->rgb")
    return LoadedImage(np.ascontiguousarray(pixels[..., :3], dtype=np.float32) / 255.0, conversions)
