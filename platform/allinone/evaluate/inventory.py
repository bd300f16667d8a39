"""``allinone data check DIR``: which standard datasets a folder holds, per task, before any build.

Datasets are recognised the way the shard builder and the evaluation find them: by their folder
names (``testsets.STANDARD_SETS`` for testing, ``testsets.TRAINING_SETS`` for training) and, for a
folder of another name, by sub-folders that form a paired layout. A folder is then surveyed with
the builder's own pairing (``sources.paired_items``): pairs or clean images, the smallest and
largest size (read from the files' headers, nothing decoded), pairs whose two sides differ in
size, files without their other half, and files that are no readable image.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from allinone.data.images import is_image_file
from allinone.data.sources import Refused, SourceError, holds_layout, paired_items
from allinone.evaluate.testsets import (
    STANDARD_SETS,
    TRAINING_SETS,
    EvalDataError,
    StandardSet,
    recognise,
)

MAX_DEPTH = 4  # folders below DIR searched for datasets (e.g. data/Train/Derain/RainTrainL)
# Below a dataset's own folder: where its splits sit, and which split each is.
SPLITS = {"": "", "train": "train", "our485": "train", "test": "test", "eval15": "test"}
SPLITS |= {"outdoor": "test", "indoor": "test"}  # SOTS


@dataclass
class Survey:
    """One dataset split as found: what a build from it would get."""

    name: str
    root: Path
    layout: str  # clean, or a paired layout (rain100l, sots, lq_gt, gopro, lol)
    split: str  # train, test, or "" when its folder does not say
    tasks: tuple[str, ...]
    count: int = 0  # pairs, or clean images
    smallest: tuple[int, int] | None = None  # (width, height)
    largest: tuple[int, int] | None = None
    mismatched: int = 0  # pairs whose sides differ in size
    unpaired: list[Refused] = field(default_factory=list)
    unreadable: list[Refused] = field(default_factory=list)

    @property
    def problems(self) -> list[Refused]:
        return [*self.unpaired, *self.unreadable]

    def note(self, size: tuple[int, int]) -> None:
        area = size[0] * size[1]
        if self.smallest is None or area < self.smallest[0] * self.smallest[1]:
            self.smallest = size
        if self.largest is None or area > self.largest[0] * self.largest[1]:
            self.largest = size


def check_data(data: Path) -> list[Survey]:
    """Every known dataset split under ``data``, surveyed; none at all is an error."""
    data = Path(data)
    if not data.is_dir():
        raise EvalDataError(f"{data}: data folder does not exist")
    by_name = {name.lower(): s for s in (*TRAINING_SETS, *STANDARD_SETS) for name in s.folders}
    surveys: list[Survey] = []
    queue = deque([(data, 0)])
    while queue:
        folder, depth = queue.popleft()
        found = _surveys(folder, by_name.get(folder.name.lower()))
        if not found and any(is_image_file(p) for p in folder.iterdir()):
            # Images in no known layout: a clean source for a synthetic task, perhaps.
            found = [_survey_clean(Survey(folder.name, folder, "clean", "", ()))]
        surveys += found
        if not found and depth < MAX_DEPTH:
            queue += [(child, depth + 1) for child in _children(folder)]
    if not surveys:
        known = sorted({s.name for s in (*TRAINING_SETS, *STANDARD_SETS)})
        raise EvalDataError(
            f"{data}: no dataset in a known layout (looked for folders named {', '.join(known)}, "
            "and for paired sub-folders such as rain/ + norain/, hazy/ + clear/, low/ + high/)"
        )
    return surveys


def _children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _surveys(folder: Path, standard: StandardSet | None) -> list[Survey]:
    """The splits of a named dataset, or of a folder whose sub-folders form a paired layout."""
    if standard is None:
        found = recognise(folder)
        if found is None:
            return []
        standard = found.standard
    default = "train" if standard in TRAINING_SETS else "test" if standard in STANDARD_SETS else ""
    for layout in standard.layouts:
        if layout == "clean":  # every image below the folder, as a shard build takes them
            return [_survey_clean(Survey(standard.name, folder, layout, default, standard.tasks))]
        splits = [
            (folder / inner, split)
            for inner, split in SPLITS.items()
            if (folder / inner).is_dir() and holds_layout(folder / inner, layout)
        ]
        if splits:
            return [
                _survey_pairs(Survey(standard.name, root, layout, split or default, standard.tasks))
                for root, split in splits
            ]
    return []


def _survey_clean(survey: Survey) -> Survey:
    files = sorted(p for p in survey.root.rglob("*") if p.is_file() and is_image_file(p))
    for path in files:
        size = _size(path, survey)
        if size:
            survey.count += 1
            survey.note(size)
    return survey


def _survey_pairs(survey: Survey) -> Survey:
    try:
        items, survey.unpaired = paired_items(survey.root, survey.layout)
    except SourceError as err:
        survey.unreadable.append(Refused(str(survey.root), str(err)))
        return survey
    for item in items:
        lq, gt = _size(Path(item.lq or ""), survey), _size(Path(item.gt), survey)
        if lq and gt:
            survey.count += 1
            survey.note(gt)
            survey.mismatched += lq != gt
    return survey


def _size(path: Path, survey: Survey) -> tuple[int, int] | None:
    """An image's size from its header; an unreadable file is recorded, not raised."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        survey.unreadable.append(Refused(str(path), f"not a readable image ({err})"))
        return None
