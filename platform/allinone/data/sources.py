"""Where a task's images come from: clean photos to degrade, or real LQ/GT pairs in known layouts.

Layouts of paired datasets, as their authors (and the repositories that pass them on) ship them:
- ``rain100l``: ``rain/rain-001.png`` pairs with ``norain/norain-001.png`` (Rain100L, RainTrainL;
  PromptIR's ``rainy/`` + ``gt/``; RainTrainL's one folder holding both ``rain-N`` and
  ``norain-N``);
- ``sots``: ``hazy/0001_0.8_0.2.jpg`` pairs with ``clear/0001.png`` (name up to the first '_';
  the numbers are the airlight and scattering coefficient used to synthesise the haze): SOTS and
  ITS, RESIDE's ``gt/`` for ``clear/``, OTS's ``haze/part1..4/`` + ``clear/clear/`` (read
  through their sub-folders);
- ``lq_gt``: ``lq/NAME`` pairs with ``gt/NAME`` (same file name);
- ``gopro``: ``SEQUENCE/blur/NAME`` pairs with ``SEQUENCE/sharp/NAME`` (keys carry the sequence),
  or the flattened ``input/`` + ``target/`` of later papers;
- ``lol``: ``low/NAME`` pairs with ``high/NAME`` (LOL's ``our485/`` and ``eval15/``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from allinone.config import DEFAULT_MAX_PIXELS
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


# Sub-folders a paired layout accepts, as its datasets ship them: (degraded, clean) names.
LAYOUT_FOLDERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "rain100l": (("rain", "rainy"), ("norain", "gt")),
    "sots": (("hazy", "haze"), ("clear", "gt")),
    "lq_gt": (("lq",), ("gt",)),
    "lol": (("low",), ("high",)),
}


def layout_folders(root: Path, layout: str) -> tuple[Path, Path] | None:
    """The (degraded, clean) sub-folders of ``root`` in ``layout``, or None."""
    lq_names, gt_names = LAYOUT_FOLDERS[layout]
    lq = next((root / name for name in lq_names if (root / name).is_dir()), None)
    gt = next((root / name for name in gt_names if (root / name).is_dir()), None)
    return (lq, gt) if lq and gt else None


def holds_layout(root: Path, layout: str) -> bool:
    """``root`` itself holds a dataset in ``layout`` (a paired layout; see the module's notes)."""
    if layout == "gopro":
        return bool(gopro_sequences(root)) or all((root / n).is_dir() for n in ("input", "target"))
    if layout == "rain100l" and _images(root, start="rain-") and _images(root, start="norain-"):
        return True  # RainTrainL's single folder
    return layout_folders(root, layout) is not None


def gopro_sequences(root: Path) -> list[Path]:
    return sorted(
        p for p in root.iterdir() if p.is_dir() and (p / "blur").is_dir() and (p / "sharp").is_dir()
    )


def paired_items(root: str | Path, layout: str) -> tuple[list[SourceItem], list[Refused]]:
    """LQ/GT pairs of a dataset in a standard layout; a pair missing a side is refused by name."""
    root = _existing_folder(root)
    pairing = {
        "rain100l": _rain100l_pairs,
        "sots": _sots_pairs,
        "lq_gt": _lq_gt_pairs,
        "gopro": _gopro_pairs,
        "lol": _lol_pairs,
    }
    if layout not in pairing:
        raise SourceError(f"unknown paired layout {layout!r} (known: {sorted(pairing)})")
    items, refused = pairing[layout](root)
    if not items:
        raise SourceError(f"{root}: no {layout} pairs found")
    return items, refused


def _rain100l_pairs(root: Path) -> tuple[list[SourceItem], list[Refused]]:
    def clean_name(lq: Path) -> str:
        return f"no{lq.stem}"

    if layout_folders(root, "rain100l") is None and holds_layout(root, "rain100l"):
        # RainTrainL as released: rain-N and norain-N side by side in one folder.
        flat = (_images(root, start="rain-"), _images(root, start="norain-"))
        return _pair_by_name(root, root, clean_name, files=flat)
    lq_dir, gt_dir = _subfolders(root, "rain100l")
    return _pair_by_name(lq_dir, gt_dir, clean_name)


def _sots_pairs(root: Path) -> tuple[list[SourceItem], list[Refused]]:
    lq_dir, gt_dir = _subfolders(root, "sots")
    files = (_images(lq_dir, recursive=True), _images(gt_dir, recursive=True))
    items, refused = _pair_by_name(lq_dir, gt_dir, lambda lq: lq.stem.split("_")[0], files=files)
    return [_with_sots_params(item) for item in items], refused


def _lq_gt_pairs(root: Path) -> tuple[list[SourceItem], list[Refused]]:
    lq_dir, gt_dir = _subfolders(root, "lq_gt")
    return _pair_by_name(lq_dir, gt_dir, lambda lq: lq.stem)


def _lol_pairs(root: Path) -> tuple[list[SourceItem], list[Refused]]:
    lq_dir, gt_dir = _subfolders(root, "lol")
    return _pair_by_name(lq_dir, gt_dir, lambda lq: lq.stem)


def _gopro_pairs(root: Path) -> tuple[list[SourceItem], list[Refused]]:
    sequences = gopro_sequences(root)
    if not sequences:  # the flattened layout of later papers
        if not ((root / "input").is_dir() and (root / "target").is_dir()):
            raise SourceError(
                f"{root}: expected sequence folders with blur/ + sharp/, or input/ + target/"
            )
        return _pair_by_name(root / "input", root / "target", lambda lq: lq.stem)
    items, refused = [], []
    for sequence in sequences:
        found = _pair_by_name(
            sequence / "blur", sequence / "sharp", lambda lq: lq.stem, f"{sequence.name}_"
        )
        items, refused = items + found[0], refused + found[1]
    return items, refused


def _images(folder: Path, recursive: bool = False, start: str = "") -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if is_image_file(p) and p.name.startswith(start) and p.is_file())


def _pair_by_name(
    lq_dir: Path,
    gt_dir: Path,
    gt_stem_of,
    prefix: str = "",
    files: tuple[list[Path], list[Path]] | None = None,
) -> tuple[list[SourceItem], list[Refused]]:
    """Pairs by name, ``files`` (degraded, clean) defaulting to the images in each folder."""
    lqs, gt_files = files or (_images(lq_dir), _images(gt_dir))
    gts = {p.stem: p for p in gt_files}
    items, refused, used = [], [], set()
    for lq in lqs:
        gt = gts.get(gt_stem_of(lq))
        if gt is None:
            refused.append(Refused(str(lq), f"no ground truth '{gt_stem_of(lq)}.*' in {gt_dir}"))
            continue
        used.add(gt.stem)
        items.append(SourceItem(stem=safe_stem(prefix + lq.stem), gt=str(gt), lq=str(lq)))
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


def _subfolders(root: Path, layout: str) -> tuple[Path, Path]:
    found = layout_folders(root, layout)
    if found is None:
        lq, gt = ("' or '".join(f"{n}/" for n in names) for names in LAYOUT_FOLDERS[layout])
        raise SourceError(f"{root}: expected sub-folders '{lq}' and '{gt}'")
    return found


def _existing_folder(source: str | Path) -> Path:
    folder = Path(source)
    if not folder.is_dir():
        raise SourceError(f"{folder}: data folder does not exist")
    return folder


def load_clean(ref: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Load a clean image given as a path or ``skimage:<name>`` (bundled, all small)."""
    if not ref.startswith("skimage:"):
        return read_image(ref, max_pixels)
    import skimage.data  # a second to import: only for the bundled photos

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
