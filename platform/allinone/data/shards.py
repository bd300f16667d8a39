"""WebDataset shards per task: build them from a task config, verify them, resume a broken build.

A sample is ``{__key__, lq.png, gt.png, json}`` (json: task, split, params used, source file,
conversions), or holds ``lq.npy, gt.npy`` where the split's ``members`` says so (see
``members``). Members are written sorted by key, the adjacency Ray's reader relies on. Each shard
is written under a temporary name and renamed only when complete (in object storage: uploaded
whole under its name, see ``storage``); ``manifest.json`` is rewritten atomically after every
finished shard with ``complete: false`` until the last, so an interrupted build resumes by keeping
exactly the shards whose sha256 the manifest recorded, and a reader never takes a build as whole
before its last shard is in. Shards are built by local processes or, on a Ray cluster, by one Ray
task per shard; either way the bytes are the same.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from allinone.base.processes import exit_with_parent
from allinone.config import DEFAULT_MAX_PIXELS, TaskConfig
from allinone.data import degradations as degradations
from allinone.data import storage
from allinone.data.images import ImageReadError, LoadedImage
from allinone.data.members import decode_pair_float, encode_member, member_names
from allinone.data.sources import Refused, SourceItem, clean_items, load_clean, paired_items
from allinone.data.storage import StoragePath

MANIFEST = "manifest.json"
MIN_SIDE = 8  # smaller images carry no usable texture for restoration
MAX_PAIR_MISMATCH = 0.1  # paired sides may differ by a few border pixels, not more


class ShardError(ValueError):
    """A refused input or a failed check; the message names the file."""


@dataclass(frozen=True)
class SampleSpec:
    key: str
    item: SourceItem
    variant: int
    level: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildRequest:
    task: TaskConfig
    split: str
    source: str
    out: StoragePath  # a folder, or a prefix in object storage
    samples_per_shard: int = 64
    seed: int = 0
    skip_bad: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger files are refused before decoding

    def shard_name(self, index: int) -> str:
        return f"{self.task.name}-{self.split}-{index:06d}.tar"


@dataclass
class ShardResult:
    name: str
    count: int
    sha256: str
    source_files: int
    refused: list[Refused]
    conversions: dict[str, list[str]]


# --------------------------------------------------------------------------- planning
def plan_samples(request: BuildRequest) -> tuple[list[SampleSpec], list[Refused]]:
    """Every sample to write, sorted by key, plus source files refused before decoding."""
    task, split = request.task, request.task.split(request.split)
    if task.kind == "paired":
        items, refused = paired_items(request.source, task.layout or "")
    else:
        items, refused = clean_items(request.source), []
    items = items[: split.max_images] if split.max_images else items
    levels = split.levels or [{}]
    variants = 1 if task.kind == "paired" else split.variants
    specs = [
        SampleSpec(_sample_key(task.name, item.stem, li, v, len(levels)), item, v, level)
        for item in items
        for li, level in enumerate(levels)
        for v in range(variants)
    ]
    return sorted(specs, key=lambda s: s.key), refused


def _sample_key(task: str, stem: str, level: int, variant: int, n_levels: int) -> str:
    level_part = f"_l{level}" if n_levels > 1 else ""
    return f"{task}_{stem}{level_part}_v{variant:03d}"


def fingerprint(request: BuildRequest, specs: list[SampleSpec]) -> str:
    """What the shards' content depends on; a resumed build must match it exactly."""
    payload = {
        # crop_border only changes how test pairs are scored, not what the shards hold
        "task": request.task.model_dump(mode="json", exclude={"crop_border"}),
        "split": request.split,
        "seed": request.seed,
        "samples_per_shard": request.samples_per_shard,
        "source": str(request.source),
        "samples": [(s.key, s.item.gt, s.item.lq) for s in specs],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- one sample
def make_sample(request: BuildRequest, spec: SampleSpec, cache: _ImageCache) -> dict[str, bytes]:
    """Degrade (or read) one sample and encode its members."""
    task, split = request.task, request.task.split(request.split)
    rng = degradations.sample_rng(request.seed, spec.key)
    gt_image = cache.get(spec.item.gt, request.max_pixels)
    conversions = list(gt_image.conversions)
    if task.kind == "paired":
        lq_image = cache.get(spec.item.lq or "", request.max_pixels)
        gt, lq, note = _align_pair(gt_image.pixels, lq_image.pixels, spec.item)
        conversions += [f"lq:{c}" for c in lq_image.conversions] + ([note] if note else [])
        conversions += _crop_note(gt.shape[:2], split.crop)
        gt, lq = _random_crop((gt, lq), split.crop, rng)
        params: Any = dict(spec.item.info)
    else:
        conversions += _crop_note(gt_image.pixels.shape[:2], split.crop)
        (gt,) = _random_crop((gt_image.pixels,), split.crop, rng)
        chain = [_with_level(step.as_chain_item(), spec.level) for step in task.degrade]
        lq, params = degradations.apply_chain(gt, chain, rng)
    meta = {
        "task": task.name,
        "split": request.split,
        "params": params,
        "source": spec.item.gt,
        "lq_source": spec.item.lq,
        "level": spec.level,
        "conversions": conversions,
    }
    lq_name, gt_name = member_names(split.members)
    return {
        lq_name: encode_member(lq, split.members),
        gt_name: encode_member(gt, split.members),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def _with_level(item: tuple[str, dict], level: dict[str, float]) -> tuple[str, dict]:
    op, params = item
    names = {p.name for p in degradations.OPS[op].params}
    return op, {**params, **{k: v for k, v in level.items() if k in names}}


def _align_pair(
    gt: np.ndarray, lq: np.ndarray, item: SourceItem
) -> tuple[np.ndarray, np.ndarray, str]:
    if gt.shape == lq.shape:
        return gt, lq, ""
    (gh, gw), (lh, lw) = gt.shape[:2], lq.shape[:2]
    if abs(gh - lh) > MAX_PAIR_MISMATCH * gh or abs(gw - lw) > MAX_PAIR_MISMATCH * gw:
        raise ImageReadError(
            f"{item.lq}: size {lw}x{lh} does not match ground truth {item.gt} ({gw}x{gh})"
        )
    # Datasets ship pairs with a few border pixels cut off one side; the pixels they share are
    # the centres. Cropped to those, and recorded in the manifest with both sizes.
    h, w = min(gh, lh), min(gw, lw)
    note = f"pair centre-cropped to common size {w}x{h} (LQ {lw}x{lh}, GT {gw}x{gh})"
    return _centre(gt, h, w), _centre(lq, h, w), note


def _centre(image: np.ndarray, h: int, w: int) -> np.ndarray:
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    return image[top : top + h, left : left + w]


def _crop_note(shape: tuple[int, ...], crop: int | None) -> list[str]:
    """What ``_random_crop`` does to an image with a side below the crop, in its words."""
    h, w = shape[:2]
    if crop is None or min(h, w) >= crop:
        return []
    if max(h, w) <= crop:
        return [f"{w}x{h} smaller than crop {crop}: kept whole"]
    short, long = ("height", "width") if h < crop else ("width", "height")
    return [f"{w}x{h}: {short} smaller than crop {crop}, kept whole; {long} cropped to {crop}"]


def _random_crop(images: tuple[np.ndarray, ...], size: int | None, rng) -> tuple[np.ndarray, ...]:
    """The same random window of every image; images smaller than the window are kept whole."""
    h, w = images[0].shape[:2]
    if size is None or (h <= size and w <= size):
        return images
    ch, cw = min(size, h), min(size, w)
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return tuple(np.ascontiguousarray(im[top : top + ch, left : left + cw]) for im in images)


class _ImageCache:
    """Variants of one image sit next to each other in key order: keep the last decoded ones.

    Two, the pair in use (a paired task reads a GT and an LQ per sample; SOTS gives one GT many
    hazy sides): a 50 MP image is 600 MB as float32, and more of them would only add memory."""

    def __init__(self, size: int = 2) -> None:
        self.size, self.images = size, {}

    def get(self, ref: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
        if ref in self.images:
            self.images[ref] = self.images.pop(ref)  # the most recently used is evicted last
            return self.images[ref]
        while len(self.images) >= self.size:  # before decoding: never one image more in memory
            self.images.pop(next(iter(self.images)))
        image = load_clean(ref, max_pixels)
        if min(image.pixels.shape[:2]) < MIN_SIDE:
            raise ImageReadError(
                f"{ref}: image is {image.pixels.shape[1]}x{image.pixels.shape[0]}, "
                f"smaller than {MIN_SIDE}x{MIN_SIDE}"
            )
        self.images[ref] = image
        return image


# --------------------------------------------------------------------------- one shard
Encoded = dict[str, bytes] | ImageReadError  # a sample's members, or why its input was refused


def encode_samples(request: BuildRequest, specs: list[SampleSpec]) -> Iterator[Encoded]:
    """Degrade and encode samples in order; a refused input comes back as its error, for the
    shard writer to raise or record (a parallel build runs this in worker processes)."""
    cache = _ImageCache()
    for spec in specs:
        try:
            yield make_sample(request, spec, cache)
        except ImageReadError as err:
            yield err


def _encode_piece(request: BuildRequest, specs: list[SampleSpec]) -> list[Encoded]:
    return list(encode_samples(request, specs))


def write_shard(
    request: BuildRequest,
    index: int,
    specs: list[SampleSpec],
    encoded: Iterable[Encoded] | None = None,
) -> ShardResult:
    """Write one shard atomically from its samples (encoded here unless ``encoded`` brings them,
    in order); refused inputs raise, or are skipped with ``skip_bad``."""
    encoded = encode_samples(request, specs) if encoded is None else encoded
    refused, conversions, count = [], {}, 0
    final = request.out / request.shard_name(index)
    digest = ""

    def write(tmp: Path) -> None:
        nonlocal count, digest
        with tarfile.open(tmp, mode="w") as tar:
            for spec, members in zip(specs, encoded, strict=True):
                if isinstance(members, ImageReadError):
                    if not request.skip_bad:
                        raise ShardError(f"{members} (use --skip-bad to record it and go on)")
                    refused.append(Refused(_failed_file(members, spec), str(members)))
                    continue
                _add_members(tar, spec.key, members)
                count += 1
                note = json.loads(members["json"])["conversions"]
                if note:
                    conversions[spec.item.gt] = note
        digest = sha256_file(tmp)

    storage.write_atomic_with(final, write)
    files = len({s.item.gt for s in specs})
    return ShardResult(final.name, count, digest, files, _unique(refused), conversions)


def _failed_file(err: ImageReadError, spec: SampleSpec) -> str:
    text = str(err)
    return next((f for f in (spec.item.lq, spec.item.gt) if f and text.startswith(f)), spec.item.gt)


def _unique(refused: list[Refused]) -> list[Refused]:
    return list({r.file: r for r in refused}.values())


def _add_members(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    for suffix in sorted(members):
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size, info.mtime, info.mode = len(members[suffix]), 0, 0o644
        tar.addfile(info, io.BytesIO(members[suffix]))


def sha256_file(path: StoragePath) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the whole build
ProgressCallback = Callable[[ShardResult], None]


def build_shards(
    request: BuildRequest,
    workers: int = 1,
    on_shard: ProgressCallback | None = None,
    on_ray: bool = False,
) -> dict[str, Any]:
    """Build (or resume) every shard of one task split and return the finished manifest: in
    ``workers`` local processes, or with ``on_ray`` one task per shard on the running Ray
    cluster."""
    request.out.mkdir(parents=True, exist_ok=True)
    specs, refused = plan_samples(request)
    if refused and not request.skip_bad:
        raise ShardError(
            f"{refused[0].file}: {refused[0].reason} (use --skip-bad to record it and go on)"
        )
    chunks = [
        specs[i : i + request.samples_per_shard]
        for i in range(0, len(specs), request.samples_per_shard)
    ]
    manifest = _start_manifest(request, specs, refused, len(chunks))
    todo = [i for i in range(len(chunks)) if not _shard_is_done(request, manifest, i)]
    _remove_stale_shards(request, len(chunks))
    _remove_temp_files(request)
    if on_ray:
        results = _ray_shards(request, chunks, todo)
    else:
        results = _run_shards(request, chunks, todo, workers)
    for result in results:
        _record(manifest, result)
        _write_manifest(request.out, manifest)
        if on_shard:
            on_shard(result)
    manifest["samples"] = sum(s["count"] for s in manifest["shards"] if s)
    manifest["complete"] = True
    manifest["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    _write_manifest(request.out, manifest)
    return manifest


PIECE_SAMPLES = 8  # samples per task handed to a worker process (whole images: never fewer)


def _run_shards(request, chunks, todo, workers) -> Iterator[ShardResult]:
    pieces = [(i, piece) for i in todo for piece in _pieces(chunks[i], PIECE_SAMPLES)]
    if workers <= 1 or len(pieces) <= 1:
        yield from (write_shard(request, i, chunks[i]) for i in todo)
        return
    # Workers degrade and encode pieces of shards; this process writes each shard, in order, as
    # its pieces arrive. Whole shards as tasks left a worker idle whenever a build had few shards
    # per worker (3 shards of 64 samples on 2 workers: 1.44x; pieces: 1.9x, benchmarks/shards.py).
    # Workers end with this process, even when it is killed (a killed build resumes anyway).
    pool = ProcessPoolExecutor(workers, initializer=exit_with_parent, initargs=(os.getpid(),))
    try:
        results = _in_order(pool, request, pieces, ahead=4 * workers)
        for i, group in itertools.groupby(results, key=lambda result: result[0]):
            encoded = itertools.chain.from_iterable(samples for _, samples in group)
            yield write_shard(request, i, chunks[i], encoded)
    finally:
        pool.shutdown(cancel_futures=True)  # an error or an interrupt stops queued pieces too


def _ray_shards(request, chunks, todo) -> Iterator[ShardResult]:
    """One Ray task per shard, on whichever node has a CPU free. A task runs ``write_shard`` on
    its own node's disk and returns the bytes, which this process publishes where the build goes:
    the output needs no mount the nodes share, and the bytes are a local build's."""
    import ray

    task = ray.remote(num_cpus=1)(_shard_bytes)
    queue = iter(todo)
    # One task per CPU at a time: every node stays busy, and few finished shards wait in memory.
    in_flight = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending = {task.remote(request, i, chunks[i]): i for i in itertools.islice(queue, in_flight)}
    try:
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            del pending[done]
            result, data = _ray_result(done)
            storage.write_atomic(request.out / result.name, data)
            yield result
            for i in itertools.islice(queue, 1):
                pending[task.remote(request, i, chunks[i])] = i
    finally:
        for ref in pending:  # an error or an interrupt stops the shards still queued
            ray.cancel(ref)


def _shard_bytes(request: BuildRequest, index: int, specs: list[SampleSpec]):
    with tempfile.TemporaryDirectory(prefix="allinone-shard-") as folder:
        result = write_shard(replace(request, out=Path(folder)), index, specs)
        return result, (Path(folder) / result.name).read_bytes()


def _ray_result(ref) -> tuple[ShardResult, bytes]:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None  # the ShardError naming the file, not Ray's traceback


def _pieces(specs: list[SampleSpec], size: int) -> list[list[SampleSpec]]:
    """Runs of about ``size`` samples; one image's samples (adjacent by key) stay in one piece,
    so each worker decodes an image once."""
    pieces, current = [], []
    for spec in specs:
        if len(current) >= size and spec.item.gt != current[-1].item.gt:
            pieces.append(current)
            current = []
        current.append(spec)
    return [*pieces, current] if current else pieces


def _in_order(pool, request, pieces, ahead: int) -> Iterator[tuple[int, list[Encoded]]]:
    """(shard index, encoded samples) per piece, in order, with at most ``ahead`` pieces
    submitted and not yet consumed: finished pieces never pile up in memory."""
    window: deque = deque()
    for i, piece in pieces:
        window.append((i, pool.submit(_encode_piece, request, piece)))
        if len(window) >= ahead:
            index, future = window.popleft()
            yield index, future.result()
    while window:
        index, future = window.popleft()
        yield index, future.result()


def _start_manifest(request, specs, refused, n_shards) -> dict[str, Any]:
    previous = read_manifest(request.out, request.task.name, request.split)
    print_ = fingerprint(request, specs)
    if previous and previous.get("fingerprint") == print_:
        return previous | {"complete": False}
    return {
        "task": request.task.name,
        "split": request.split,
        "kind": request.task.kind,
        "config": request.task.model_dump(mode="json"),
        "seed": request.seed,
        "samples_per_shard": request.samples_per_shard,
        "source": str(request.source),
        "fingerprint": print_,
        "complete": False,
        "samples": 0,
        "shards": [None] * n_shards,
        "source_files": sorted({f for s in specs for f in (s.item.gt, s.item.lq) if f}),
        "skipped": [asdict(r) for r in refused],
        "conversions": {},
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _shard_is_done(request: BuildRequest, manifest: dict[str, Any], index: int) -> bool:
    record = manifest["shards"][index]
    path = request.out / request.shard_name(index)
    return bool(record) and path.is_file() and sha256_file(path) == record["sha256"]


def _remove_stale_shards(request: BuildRequest, n_shards: int) -> None:
    for path in request.out.glob(f"{request.task.name}-{request.split}-*.tar"):
        index = path.stem.rsplit("-", 1)[-1]
        if not index.isdigit() or int(index) >= n_shards:
            path.unlink()


def _temp_files(out: StoragePath, prefix: str = "") -> list[StoragePath]:
    """Temporary files (shards and manifests being written) that a killed build left behind."""
    return sorted(out.glob(f".{prefix}*.part"))


def _remove_temp_files(request: BuildRequest) -> None:
    # A build killed hard (SIGKILL, OOM) never reaches write_shard's cleanup; one folder holds
    # one task split, so no other build is writing these.
    for prefix in (f"{request.task.name}-{request.split}-", "manifest."):
        for path in _temp_files(request.out, prefix):
            path.unlink(missing_ok=True)


def _record(manifest: dict[str, Any], result: ShardResult) -> None:
    index = int(Path(result.name).stem.rsplit("-", 1)[-1])
    manifest["shards"][index] = {
        "name": result.name,
        "count": result.count,
        "sha256": result.sha256,
    }
    # A refused file appears once, however many of its samples or rebuilt shards refused it.
    skipped = manifest["skipped"] + [asdict(r) for r in result.refused]
    manifest["skipped"] = list({r["file"]: r for r in skipped}.values())
    manifest["conversions"].update(result.conversions)


# --------------------------------------------------------------------------- manifests
def read_manifest(out: StoragePath, task: str, split: str) -> dict[str, Any] | None:
    """The folder's manifest; one folder holds one task split, so another's is an error."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if (manifest.get("task"), manifest.get("split")) != (task, split):
        raise ShardError(
            f"{path}: holds shards of {manifest.get('task')}/{manifest.get('split')}, "
            f"not {task}/{split}; build each task split into its own folder"
        )
    return manifest


def _write_manifest(out: StoragePath, manifest: dict[str, Any]) -> None:
    storage.write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


def shard_folder(root: StoragePath, task: str, split: str) -> StoragePath:
    """A task split's folder under a shard root (a run's is ``<workdir>/shards``)."""
    return root / task / split


def shard_urls(out: StoragePath, task: str, split: str) -> list[str]:
    """The shards of a complete build, in order; an incomplete or missing build is an error."""
    manifest = read_manifest(out, task, split)
    if manifest is None:
        raise ShardError(f"{out / MANIFEST}: no manifest (build the shards first)")
    if not manifest.get("complete"):
        raise ShardError(f"{out / MANIFEST}: build is incomplete (re-run it to resume)")
    return [str(out / s["name"]) for s in manifest["shards"] if s and s["count"]]


# --------------------------------------------------------------------------- verification
@dataclass
class VerifyReport:
    manifests: int = 0
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)


def verify_shards(folder: StoragePath) -> VerifyReport:
    """Re-check every manifest in a folder: counts, hashes, each sample decoding as a pair."""
    report = VerifyReport()
    paths = sorted(folder.rglob(MANIFEST))
    if not paths:
        report.problems.append(f"{folder}: no {MANIFEST} found")
    for path in paths:
        report.manifests += 1
        manifest = json.loads(path.read_text())
        if not manifest.get("complete"):
            report.problems.append(f"{path}: build is incomplete")
        for temp in _temp_files(path.parent):
            report.problems.append(f"{temp}: temporary file left by an interrupted build")
        for record in filter(None, manifest["shards"]):
            report.shards += 1
            report.samples += _verify_shard(path.parent / record["name"], record, report.problems)
        if report.problems:
            continue
        counted = sum(s["count"] for s in manifest["shards"] if s)
        if counted != manifest.get("samples"):
            report.problems.append(
                f"{path}: shards hold {counted} samples, manifest says {manifest.get('samples')}"
            )
    return report


def _verify_shard(path: StoragePath, record: dict[str, Any], problems: list[str]) -> int:
    if not path.is_file():
        problems.append(f"{path}: shard missing")
        return 0
    if sha256_file(path) != record["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest (corrupt or changed)")
        return 0
    count = 0
    try:
        for key, members in iter_tar_samples(path):
            _check_pair(path, key, members, problems)
            count += 1
    except (tarfile.TarError, OSError) as err:
        problems.append(f"{path}: unreadable tar ({err})")
    if count != record["count"]:
        problems.append(f"{path}: holds {count} samples, manifest says {record['count']}")
    return count


def _check_pair(path: Path, key: str, members: dict[str, bytes], problems: list[str]) -> None:
    if "json" not in members:
        problems.append(f"{path}: sample {key} lacks ['json']")
        return
    try:
        lq, gt = decode_pair_float(members, f"{path}:{key}")
    except ImageReadError as err:
        problems.append(str(err))
        return
    if lq.shape != gt.shape:
        problems.append(f"{path}: sample {key} has LQ {lq.shape[:2]} but GT {gt.shape[:2]}")


def iter_tar_samples(path: StoragePath) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a shard's members by key (they are adjacent: written sorted), read as one stream."""
    key, members = None, {}
    with path.open("rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name_key, _, suffix = info.name.partition(".")
            if key is not None and name_key != key:
                yield key, members
                members = {}
            key = name_key
            members[suffix] = tar.extractfile(info).read()
    if key is not None:
        yield key, members
