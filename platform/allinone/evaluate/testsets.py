"""Test sets: the standard benchmarks found under a data folder, else a task's synthetic split.

The all-in-one protocol of the papers is fixed: CBSD68 (or BSD68) with Gaussian noise at sigma
15/25/50, Rain100L and SOTS-outdoor (3 tasks); the 5-task protocol adds GoPro and LOL. A user who
has these sets points ``--data`` at the folder holding them; each is recognised by its folder name
and must then be in its authors' layout (a folder named like a set but laid out otherwise is an
error, not a silent skip). A folder of another name is still used when its sub-folders are
unmistakably a paired layout (``rain/`` + ``norain/``, ``hazy/`` + ``clear/``, GoPro sequences,
``low/`` + ``high/``). Tasks without a found set are scored on their own synthetic test split,
degraded exactly as the test shards are (same seed, same sample keys).

Every set yields (key, degraded, ground truth) pairs through the shard builder's own sample code,
so a benchmark image is read, aligned and quantised exactly like a training sample.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from allinone.config import BenchmarkSet, SplitConfig, TaskConfig, resolve_source, validate
from allinone.data.images import is_image_file
from allinone.data.members import decode_pair_float
from allinone.data.shards import BuildRequest, SampleSpec, encode_samples, plan_samples
from allinone.data.sources import (
    LAYOUT_FOLDERS,
    SourceError,
    SourceItem,
    holds_layout,
    paired_items,
)
from allinone.data.storage import StoragePath
from allinone.evaluate.scoring import Pair, test_pairs


class EvalDataError(ValueError):
    """A data folder or test set that cannot be used; the message names the folder."""


# --------------------------------------------------------------------------- the protocol
SIGMAS = ({"sigma": 15.0}, {"sigma": 25.0}, {"sigma": 50.0})


@dataclass(frozen=True)
class StandardSet:
    name: str
    folders: tuple[str, ...]  # folder names it ships under (compared case-insensitively)
    tasks: tuple[str, ...]  # the task names it tests
    layouts: tuple[str, ...]  # accepted layouts: clean, rain100l, sots, lq_gt, gopro, lol
    levels: tuple[dict[str, float], ...] = ()  # clean sets: the fixed degradation settings


STANDARD_SETS: tuple[StandardSet, ...] = (
    StandardSet("CBSD68", ("CBSD68",), ("denoise",), ("clean",), SIGMAS),
    StandardSet("BSD68", ("BSD68",), ("denoise",), ("clean",), SIGMAS),
    StandardSet("Rain100L", ("Rain100L",), ("derain", "rain100l"), ("rain100l",)),
    StandardSet("SOTS-outdoor", ("SOTS-outdoor", "SOTS", "outdoor"), ("dehaze", "sots"), ("sots",)),
    StandardSet("GoPro", ("GoPro", "GOPRO_Large"), ("deblur", "motion_blur"), ("gopro",)),
    StandardSet("LOL", ("LOL", "LOLdataset", "LOL-v1"), ("lowlight",), ("lol", "lq_gt")),
)
# The training sets of the same papers, as they download (``allinone data check`` finds them):
# BSD400 + WED for denoising, RainTrainL, RESIDE's OTS / ITS, GoPro's and LOL's own train
# splits (beside their test splits above), and DF2K's clean photos for every synthetic task.
MIOIR_TASKS = ("sr", "deblur", "denoise", "jpeg", "derain", "dehaze", "lowlight")
CLEAN = ("clean",)
TRAINING_SETS: tuple[StandardSet, ...] = (
    StandardSet("BSD400", ("BSD400",), ("denoise",), ("clean",)),
    StandardSet("WED", ("WED", "WaterlooED", "exploration_database_and_code"), ("denoise",), CLEAN),
    StandardSet("RainTrainL", ("RainTrainL", "rain_data_train_Light"), ("derain",), ("rain100l",)),
    StandardSet("OTS", ("OTS", "OTS_BETA"), ("dehaze",), ("sots",)),
    StandardSet("ITS", ("ITS", "ITS_v2"), ("dehaze",), ("sots",)),
    StandardSet("DIV2K", ("DIV2K", "DIV2K_train_HR", "DIV2K_valid_HR"), MIOIR_TASKS, ("clean",)),
    StandardSet("Flickr2K", ("Flickr2K", "Flickr2K_HR"), MIOIR_TASKS, ("clean",)),
)
THREE_TASK = ("Rain100L", "SOTS-outdoor")  # plus CBSD68 or BSD68
FIVE_TASK = (*THREE_TASK, "GoPro", "LOL")

# Sub-folders that name a paired layout (the first name of each side; ``LAYOUT_FOLDERS`` has
# every name accepted), and the tasks a set so laid out can only be testing.
LAYOUT_DIRS = {layout: (lq[0], gt[0]) for layout, (lq, gt) in LAYOUT_FOLDERS.items()}
LAYOUT_TASKS = {
    "rain100l": ("derain", "rain100l"),
    "sots": ("dehaze", "sots"),
    "gopro": ("deblur", "motion_blur"),
    "lol": ("lowlight",),
}
# Where datasets put their pairs below the set's own folder (SOTS/outdoor, LOL/eval15, .../test).
INNER = ("", "test", "outdoor", "eval15")


def standard_sets(tasks: dict[str, TaskConfig]) -> list[StandardSet]:
    """The built-in protocol sets plus the ``benchmarks`` task configs declare."""
    sets = list(STANDARD_SETS)
    known = {s.name.lower() for s in sets}
    for name, task in tasks.items():
        for bench in task.benchmarks:
            if bench.name.lower() not in known:
                sets.append(_from_config(name, bench))
                known.add(bench.name.lower())
    return sets


def _from_config(task: str, bench: BenchmarkSet) -> StandardSet:
    return StandardSet(
        bench.name, (Path(bench.path).name,), (task,), (bench.layout,), tuple(bench.levels)
    )


# --------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class FoundSet:
    standard: StandardSet
    root: Path  # the folder that holds the layout's sub-folders (or the clean images)
    layout: str


@dataclass
class Discovery:
    found: list[FoundSet] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # folders that are no known test set

    def for_task(self, task: str) -> list[FoundSet]:
        return [f for f in self.found if task in f.standard.tasks]

    def protocol(self) -> str:
        names = {f.standard.name for f in self.found}
        if not names & {"CBSD68", "BSD68"} or not set(THREE_TASK) <= names:
            return "partial"
        return "5-task" if set(FIVE_TASK) <= names else "3-task"


def discover(data: Path, sets: Sequence[StandardSet] = STANDARD_SETS) -> Discovery:
    """Every test set in its standard layout in ``data``, its sub-folders or ``data/test``."""
    data = Path(data)
    if not data.is_dir():
        raise EvalDataError(f"{data}: test data folder does not exist")
    by_name = {name.lower(): s for s in sets for name in s.folders}
    result = Discovery()
    for folder in _candidates(data):
        standard = by_name.get(folder.name.lower())
        if standard is not None:
            result.found.append(_expect_layout(folder, standard))
            continue
        found = recognise(folder)
        if found is not None:
            result.found.append(found)
        elif folder != data and folder.name != "test":
            result.ignored.append(folder.name)
    if not result.found:
        raise EvalDataError(
            f"{data}: no test set in a known layout (looked for folders named "
            f"{', '.join(sorted({s.name for s in sets}))}, or sub-folders "
            f"{', '.join('+'.join(d) for d in LAYOUT_DIRS.values())}, or GoPro sequences)"
        )
    return result


def _candidates(data: Path) -> list[Path]:
    children = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    nested = data / "test"
    if nested.is_dir():
        children += sorted(p for p in nested.iterdir() if p.is_dir())
    return [data, *children]


def _expect_layout(folder: Path, standard: StandardSet) -> FoundSet:
    for layout in standard.layouts:
        root = find_layout(folder, layout)
        if root is not None:
            return FoundSet(standard, root, layout)
    expected = " or ".join(_describe_layout(layout) for layout in standard.layouts)
    raise EvalDataError(
        f"{folder}: a {standard.name} folder in no known layout (expected {expected})"
    )


def _describe_layout(layout: str) -> str:
    if layout == "clean":
        return "clean image files"
    if layout == "gopro":
        return "sequence folders with blur/ + sharp/, or input/ + target/"
    return " + ".join(f"{d}/" for d in LAYOUT_DIRS[layout])


def recognise(folder: Path) -> FoundSet | None:
    """A folder of another name whose sub-folders unmistakably form a paired layout."""
    for layout, tasks in LAYOUT_TASKS.items():
        root = find_layout(folder, layout)
        if root is not None:
            return FoundSet(
                StandardSet(folder.name, (folder.name,), tasks, (layout,)), root, layout
            )
    return None


def find_layout(folder: Path, layout: str) -> Path | None:
    """The folder at or just below ``folder`` that holds ``layout``, or None."""
    if layout == "clean":
        return folder if any(is_image_file(p) for p in folder.iterdir() if p.is_file()) else None
    for inner in INNER:
        root = folder / inner if inner else folder
        if root.is_dir() and holds_layout(root, layout):
            return root
    return None


# --------------------------------------------------------------------------- test sets
@dataclass(frozen=True)
class EvalSet:
    """Pairs of one task from one source: a benchmark (at one level) or a synthetic split."""

    task: str
    name: str  # e.g. CBSD68-sigma15, Rain100L, synthetic-quality40
    origin: str  # "benchmark" or "synthetic"
    load: Callable[[int | None], Iterator[Pair]]
    crop_border: int = 0  # pixels ignored at each border when scoring (the task's protocol)

    def pairs(self, limit: int | None = None) -> Iterator[Pair]:
        return self.load(limit)


def level_label(level: dict[str, float]) -> str:
    return "-".join(f"{name}{value:g}" for name, value in level.items())


def _named(base: str, level: dict[str, float]) -> str:
    return f"{base}-{level_label(level)}" if level else base


def benchmark_sets(found: FoundSet, task: str, config: TaskConfig, seed: int) -> list[EvalSet]:
    """One test set per level of a found benchmark, for ``task``."""
    standard = found.standard
    if found.layout == "clean":
        if config.kind != "synthetic":
            raise EvalDataError(f"{found.root}: {standard.name} needs task {task} to degrade it")
        levels = list(standard.levels) or [{}]
        return [
            _clean_set(found, task, config, level, _named(standard.name, level), seed)
            for level in levels
        ]
    items = _paired_items(found)
    request = _paired_request(task, found.root, seed)
    specs = [SampleSpec(f"{task}_{item.stem}_v000", item, 0) for item in items]
    loader = _loader(request, specs)
    return [EvalSet(task, standard.name, "benchmark", loader, config.crop_border)]


def _clean_set(found, task, config, level, name, seed) -> EvalSet:
    data = config.model_dump(mode="json")
    data["test"] = {"source": str(found.root), "levels": [level] if level else []}
    degraded = validate(TaskConfig, data, f"{found.standard.name} ({task})")
    request = BuildRequest(degraded, "test", str(found.root), Path(), seed=seed)
    specs, _ = plan_samples(request)
    return EvalSet(task, name, "benchmark", _loader(request, specs), config.crop_border)


def _paired_request(task: str, root: Path, seed: int) -> BuildRequest:
    # The shard builder reads, aligns and encodes a pair the same way whatever its layout.
    config = TaskConfig(name=task, kind="paired", layout="lq_gt", test=SplitConfig())
    return BuildRequest(config, "test", str(root), Path(), seed=seed)


def _paired_items(found: FoundSet) -> list[SourceItem]:
    try:
        items, refused = paired_items(found.root, found.layout)
    except SourceError as err:
        raise EvalDataError(str(err)) from None
    if refused:
        raise EvalDataError(f"{refused[0].file}: {refused[0].reason}")
    return items


def synthetic_sets(
    task: str,
    config: TaskConfig,
    config_path: Path,
    seed: int,
    shards: StoragePath | None = None,
) -> list[EvalSet]:
    """A task's own test split, one set per level: from built shards when given (a curriculum
    has them), else degraded now from the configured source exactly as the shards would be."""
    levels = config.test.levels or [{}]
    if shards is not None:
        return [
            EvalSet(
                task,
                _named("synthetic", level),
                "synthetic",
                _shard_loader(shards, task, i if len(levels) > 1 else None),
                config.crop_border,
            )
            for i, level in enumerate(levels)
        ]
    if config.test.source is None:
        raise EvalDataError(
            f"{config_path}: test.source: task {task} has no test split; "
            "give its benchmark folder with --data"
        )
    source = resolve_source(config.test.source, config_path.parent, config_path, "test.source")
    request = BuildRequest(config, "test", str(source), Path(), seed=seed)
    specs, refused = plan_samples(request)
    if refused:
        raise EvalDataError(f"{refused[0].file}: {refused[0].reason}")
    return [
        EvalSet(
            task,
            _named("synthetic", level),
            "synthetic",
            _loader(request, [s for s in specs if s.level == level]),
            config.crop_border,
        )
        for level in levels
    ]


def _loader(request: BuildRequest, specs: list[SampleSpec]) -> Callable[[int | None], Iterator]:
    def load(limit: int | None) -> Iterator[Pair]:
        chosen = specs[:limit] if limit is not None else specs
        for spec, members in zip(chosen, encode_samples(request, chosen), strict=True):
            if isinstance(members, Exception):
                raise members
            yield (spec.key, *decode_pair_float(members, spec.key))

    return load


_LEVEL_IN_KEY = re.compile(r"_l(\d+)_v\d+$")


def _shard_loader(
    folder: StoragePath, task: str, level: int | None
) -> Callable[[int | None], Iterator]:
    def load(limit: int | None) -> Iterator[Pair]:
        count = 0
        for key, lq, gt in test_pairs(folder, task):
            if limit is not None and count >= limit:
                return
            match = _LEVEL_IN_KEY.search(key)
            if level is None or (match and int(match.group(1)) == level):
                count += 1
                yield key, lq, gt

    return load
