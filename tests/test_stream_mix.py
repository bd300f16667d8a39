"""The stream's plan honours the configured mixing weights, on real shards (no Ray needed), and its
shuffle buffer serves every row once, the first batch as soon as it can."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from allinone.config import load_task
from allinone.data.members import decode_rgb8
from allinone.data.shards import BuildRequest, build_shards, iter_tar_samples
from allinone.data.stream import (
    RampingShuffleBuffer,
    StreamPlan,
    TaskShards,
    augment,
    group_reads,
    plan_reads,
    planned_crops,
    read_crops,
    shuffled_batches,
    task_shards,
    training_dataset,
)
from conftest import CLEAN_PHOTOS

PHOTOS = sorted(CLEAN_PHOTOS.glob("*.jpg"))[:3]
CROP = 32


def build_task(root: Path, name: str, op: str, stored: int = CROP) -> Path:
    """3 photos x 4 variants = 12 samples of ``stored`` px in 3 shards of 4."""
    task = root / f"{name}.yaml"
    task.write_text(
        f"name: {name}\nkind: synthetic\ndegrade:\n  - {{op: {op}}}\n"
        f"train: {{variants: 4, crop: {stored}}}\n"
    )
    photos = root / "photos"
    photos.mkdir(exist_ok=True)
    for photo in PHOTOS:
        (photos / photo.name).write_bytes(photo.read_bytes())
    out = root / name
    build_shards(BuildRequest(load_task(task), "train", str(photos), out, samples_per_shard=4))
    return out


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory) -> tuple[TaskShards, TaskShards]:
    root = tmp_path_factory.mktemp("mix")
    noise = task_shards(build_task(root, "noise", "gaussian_noise"), "noise", 0)
    blur = task_shards(build_task(root, "blur", "gaussian_blur"), "blur", 1)
    assert (len(noise.urls), noise.samples) == (len(blur.urls), blur.samples) == (3, 12)
    return noise, blur


def planned_samples(plan: StreamPlan) -> Counter:
    counted = Counter()
    for read in plan_reads(plan):
        counted[read["task_id"]] += read["limit"]
    return counted


@pytest.mark.parametrize("ratio", [3, 9])
@pytest.mark.parametrize("budget", [16, 40, 1000])
def test_planned_samples_follow_the_weights(two_tasks, ratio: int, budget: int) -> None:
    noise, blur = two_tasks
    plan = StreamPlan(two_tasks, {"noise": ratio, "blur": 1}, CROP, budget, seed=3)
    counted = planned_samples(plan)
    total = counted[0] + counted[1]
    assert total >= budget, "the plan must cover the budget"
    assert counted[0] / total == pytest.approx(ratio / (ratio + 1), abs=0.03), counted


def test_passes_beyond_one_cycle_every_shard(two_tasks) -> None:
    noise, blur = two_tasks
    plan = StreamPlan(two_tasks, {"noise": 1, "blur": 1}, CROP, 400, seed=0)
    reads = [r for r in plan_reads(plan) if r["task_id"] == 0]
    per_shard = Counter(r["url"] for r in reads)
    assert set(per_shard) == set(noise.urls)
    assert max(per_shard.values()) - min(per_shard.values()) <= 1, per_shard


def test_same_seed_same_plan_other_seed_differs(two_tasks) -> None:
    plan = StreamPlan(two_tasks, {"noise": 3, "blur": 1}, CROP, 50, seed=7)
    assert plan_reads(plan) == plan_reads(plan)
    other = StreamPlan(two_tasks, {"noise": 3, "blur": 1}, CROP, 50, seed=8)
    assert plan_reads(plan) != plan_reads(other)


def test_read_with_a_limit_keeps_that_many_crops(two_tasks) -> None:
    noise, _ = two_tasks
    read = {"url": noise.urls[0], "task_id": 0, "samples": noise.counts[0], "seed": 5}
    read |= {"turns": True, "crops": 1}
    whole = list(read_crops(read | {"limit": noise.counts[0]}, CROP))
    part = list(read_crops(read | {"limit": 3}, CROP))
    assert len(whole) == noise.counts[0] == 4 and len(part) == 3
    assert all(row["lq"].shape == row["gt"].shape == (CROP, CROP, 3) for row in part)
    again = list(read_crops(read | {"limit": 3}, CROP))
    assert all(np.array_equal(a["gt"], b["gt"]) for a, b in zip(part, again, strict=True))


def test_reads_carry_whether_their_task_may_be_turned(two_tasks) -> None:
    noise, blur = two_tasks
    upright_blur = TaskShards(blur.name, blur.task_id, blur.urls, blur.counts, turns=False)
    reads = plan_reads(StreamPlan((noise, upright_blur), {}, CROP, 40, seed=0))
    assert {r["task_id"]: r["turns"] for r in reads} == {0: True, 1: False}


def test_an_upright_crop_is_mirrored_but_never_turned() -> None:
    # Brightness grows down the rows: a turned crop grows along a row instead.
    ramp = np.repeat(np.arange(48, dtype=np.uint8)[:, None], 48, axis=1)[..., None].repeat(3, -1)
    rng = np.random.default_rng(0)

    def grows_downwards(crop: np.ndarray) -> bool:
        return bool((np.diff(crop[..., 0].astype(int), axis=0) == 1).all())

    upright = [augment(ramp, ramp, CROP, rng, turns=False) for _ in range(32)]
    assert all(grows_downwards(lq) and np.array_equal(lq, gt) for lq, gt in upright)
    turned = [augment(ramp, ramp, CROP, rng)[0] for _ in range(32)]
    assert not all(grows_downwards(lq) for lq in turned), "turns are on by default"


def test_several_crops_are_cut_from_each_decoded_sample(tmp_path: Path) -> None:
    """``crops`` windows of every sample decoded, each the same window of LQ and GT; the plan
    counts crops, so a budget needs a quarter of the decodes at 4 crops per sample."""
    folder = build_task(tmp_path, "noise", "gaussian_noise", stored=4 * CROP)
    noise = task_shards(folder, "noise", 0)
    reads = plan_reads(StreamPlan((noise,), {}, CROP, 40, seed=1, crops_per_sample=4))
    assert sum(r["limit"] for r in reads) == 50 and all(r["limit"] <= 16 for r in reads)
    read = reads[0] | {"turns": False, "limit": 10}
    rows = list(read_crops(read, CROP))
    assert len(rows) == 10
    samples = [m for _, m in iter_tar_samples(Path(read["url"]))]
    pairs = [(decode_rgb8(m["lq.png"], "lq"), decode_rgb8(m["gt.png"], "gt")) for m in samples]
    sources = [_window_of(row, pairs) for row in rows]
    assert len(set(sources)) == 3  # ceil(10 / 4) samples decoded, 4 + 4 + 2 crops
    assert len({row["gt"].tobytes() for row in rows}) == 10  # different windows


def test_a_png_is_decoded_in_part_only_where_no_exif_can_turn_it() -> None:
    """Asked for its first rows, a shard PNG decodes to exactly the whole image's first rows; one
    with an EXIF orientation decodes whole and upright, as without the rows."""
    from PIL import Image

    photo = Image.open(PHOTOS[0]).convert("RGB")
    whole = np.asarray(photo)
    plain, turned = io.BytesIO(), io.BytesIO()
    photo.save(plain, format="PNG", compress_level=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    photo.save(turned, format="PNG", exif=exif.tobytes())
    top = decode_rgb8(plain.getvalue(), "plain.png", rows=40)
    assert top.shape == (40, *whole.shape[1:]) and np.array_equal(top, whole[:40])
    assert np.array_equal(decode_rgb8(plain.getvalue(), "plain.png", rows=10**6), whole)
    upright = decode_rgb8(turned.getvalue(), "turned.png", rows=40)
    assert upright.shape == (whole.shape[1], whole.shape[0], 3)
    assert np.array_equal(upright, decode_rgb8(turned.getvalue(), "turned.png"))


def _window_of(row: dict, pairs: list) -> int:
    """The sample whose LQ and GT both hold the row's crop at one window (mirrored or not)."""
    for index, (lq, gt) in enumerate(pairs):
        rows = np.lib.stride_tricks.sliding_window_view(gt, (CROP, 3), axis=(1, 2))[:, :, 0]
        for flip in (False, True):
            want_lq = row["lq"][:, ::-1] if flip else row["lq"]
            want_gt = row["gt"][:, ::-1] if flip else row["gt"]
            # Windows whose top row matches, then the whole window of both sides.
            for top, left in zip(*np.nonzero((rows == want_gt[0]).all(axis=(-2, -1))), strict=True):
                window = (slice(top, top + CROP), slice(left, left + CROP))
                if np.array_equal(gt[window], want_gt) and np.array_equal(lq[window], want_lq):
                    return index
    raise AssertionError("a crop that is no window of any sample")


def _block(start: int, rows: int) -> dict[str, np.ndarray]:
    """Rows numbered ``start..``: ``id`` names each, ``pixels`` carries it in an image column."""
    ids = np.arange(start, start + rows)
    return {"id": ids, "pixels": np.broadcast_to(ids[:, None, None], (rows, 4, 4)).copy()}


def test_the_shuffle_buffer_serves_its_first_batch_from_the_first_block() -> None:
    buffer = RampingShuffleBuffer(capacity=64, batch_size=8, seed=0)
    buffer.add(_block(0, 8))
    assert buffer.ready(), "one block of a batch is enough for the first batch"
    buffer.take()
    buffer.add(_block(8, 8))
    assert not buffer.ready(), "the second batch waits for two batches' rows"
    buffer.add(_block(16, 8))
    assert buffer.ready()


def test_the_shuffle_buffer_serves_every_row_once_and_mixes_blocks() -> None:
    buffer, served = RampingShuffleBuffer(capacity=64, batch_size=8, seed=1), []
    for start in range(0, 400, 16):  # 25 blocks of 16 rows, as 25 shard reads would arrive
        buffer.add(_block(start, 16))
        while buffer.ready():
            served.append(buffer.take())
    while buffer.size >= 8:
        served.append(buffer.take())
    ids = np.concatenate([batch["id"] for batch in served])
    assert sorted(ids) == list(range(400)), "each row served exactly once"
    assert all((b["pixels"] == b["id"][:, None, None]).all() for b in served), "rows kept whole"
    blocks_per_batch = [len(set(batch["id"] // 16)) for batch in served[8:]]
    assert min(blocks_per_batch) >= 2 and np.mean(blocks_per_batch) > 3, blocks_per_batch


@pytest.mark.parametrize("reads, slots, limit", [(40, 4, 64), (9, 2, 64), (3, 8, 3), (1, 1, 64)])
def test_read_tasks_start_with_parts_of_a_read_and_end_on_single_reads(
    reads: int, slots: int, limit: int
) -> None:
    """Every read once, in the planned order; the first read cut in FIRST_READ_PARTS tasks (no
    more than the samples it keeps: the first batch waits for the first tasks' blocks), no task
    over MAX_READS_PER_TASK, tasks shrinking towards the pass's end."""
    from allinone.data.stream import FIRST_READ_PARTS, MAX_READS_PER_TASK

    read = {"samples": 64, "limit": limit, "crops": 1}
    planned = [{"url": f"shard-{i}", **read} for i in range(reads)]
    tasks = group_reads(planned, slots)
    parts = min(FIRST_READ_PARTS, limit)
    assert [task["reads"] for task in tasks[:parts]] == [
        [{**planned[0], "part": (i, parts)}] for i in range(parts)
    ]
    sizes = [len(task["reads"]) for task in tasks[parts:]]
    assert [read for task in tasks[parts:] for read in task["reads"]] == planned[1:]
    assert sizes == sorted(sizes, reverse=True) and max(sizes, default=1) <= MAX_READS_PER_TASK
    assert not sizes or sizes[-1] == 1, sizes
    if reads == 40:
        assert max(sizes) == MAX_READS_PER_TASK and len(sizes) <= reads / 2, sizes


@pytest.mark.parametrize("crops, limit, parts", [(1, 4, 2), (1, 3, 2), (4, 13, 2), (4, 16, 4)])
def test_parts_of_a_read_cut_its_crops_from_disjoint_samples(
    two_tasks, crops, limit, parts
) -> None:
    noise, _ = two_tasks
    read = {"url": noise.urls[0], "task_id": 0, "samples": noise.counts[0], "seed": 5}
    read |= {"turns": True, "crops": crops, "limit": limit}
    whole, _ = planned_crops(read)
    cut = [planned_crops(read | {"part": (i, parts)})[0] for i in range(parts)]
    assert all(cut) and sum(len(c) for c in cut) == len(set().union(*cut)), "disjoint samples"
    assert {k: v for c in cut for k, v in c.items()} == whole and sum(whole.values()) == limit
    rows = [list(read_crops(read | {"part": (i, parts)}, CROP)) for i in range(parts)]
    assert [len(r) for r in rows] == [sum(c.values()) for c in cut]


def test_the_read_ahead_bound_is_a_crop_a_sample_and_reaches_ray_train(
    ray_session, two_tasks
) -> None:
    """The object store a stage may fill ahead is READ_AHEAD_SHARDS whole shards' worth of
    crops, however many crops a read cuts from each sample, and Ray Train's DataConfig keeps it
    (once per worker) instead of its own unbounded defaults."""
    from allinone.data.stream import READ_AHEAD_SHARDS, read_ahead_bytes, train_data_config

    one = StreamPlan(two_tasks, {}, CROP, samples=40, seed=0)
    four = StreamPlan(two_tasks, {}, CROP, samples=40, seed=0, crops_per_sample=4)
    bound = READ_AHEAD_SHARDS * max(two_tasks[0].counts) * CROP * CROP * 3 * 2
    assert read_ahead_bytes(one) == read_ahead_bytes(four) == bound
    dataset = training_dataset(four)
    assert dataset.context.execution_options.resource_limits.object_store_memory == bound
    options = train_data_config(dataset, workers=2)._resolve_execution_options("train")
    assert options.resource_limits.object_store_memory == 2 * bound


def test_shuffled_batches_stream_a_real_ray_pass(ray_session, two_tasks) -> None:
    plan = StreamPlan(two_tasks, {}, CROP, samples=40, seed=0)
    planned = sum(read["limit"] for read in plan_reads(plan))  # 40 x the safety margin: 50
    batches = list(shuffled_batches(training_dataset(plan).iterator(), 8, 24, seed=0))
    assert len(batches) == planned // 8
    assert {tuple(b["lq"].shape) for b in batches} == {(8, CROP, CROP, 3)}
    assert str(batches[0]["gt"].dtype) == "torch.uint8"
    task_ids = np.concatenate([b["task_id"].numpy() for b in batches])
    assert set(task_ids) == {0, 1}


def test_a_read_task_sends_its_crops_on_in_blocks_of_block_rows(
    ray_session, tmp_path: Path, monkeypatch
) -> None:
    """A read of 16 crops (4 from each of 4 samples) leaves its task as blocks of about
    ``BLOCK_ROWS``, not one block of the whole read: the first batch need not wait for it."""
    from allinone.data import stream

    monkeypatch.setattr(stream, "BLOCK_ROWS", 4)
    noise = task_shards(
        build_task(tmp_path, "noise", "gaussian_noise", stored=2 * CROP), "noise", 0
    )
    plan = StreamPlan((noise,), {}, CROP, samples=32, seed=0, crops_per_sample=4)
    blocks = list(training_dataset(plan).iterator().iter_batches(batch_size=None))
    sizes = [len(block["task_id"]) for block in blocks]
    assert sum(sizes) == sum(read["limit"] for read in plan_reads(plan)) == 40
    assert max(sizes) <= 5 and len(blocks) >= 8, sizes
