"""The stream's plan honours the configured mixing weights, on real shards (no Ray needed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from allinone.config import load_task
from allinone.data.shards import BuildRequest, build_shards
from allinone.data.stream import (
    StreamPlan,
    TaskShards,
    augment,
    plan_reads,
    read_crops,
    task_shards,
)
from conftest import CLEAN_PHOTOS

PHOTOS = sorted(CLEAN_PHOTOS.glob("*.jpg"))[:3]
CROP = 32


def build_task(root: Path, name: str, op: str) -> Path:
    """3 photos x 4 variants = 12 samples in 3 shards of 4."""
    task = root / f"{name}.yaml"
    task.write_text(
        f"name: {name}\nkind: synthetic\ndegrade:\n  - {{op: {op}}}\n"
        f"train: {{variants: 4, crop: {CROP}}}\n"
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
    read["turns"] = True
    whole = read_crops(read | {"limit": noise.counts[0]}, CROP)
    part = read_crops(read | {"limit": 3}, CROP)
    assert len(whole) == noise.counts[0] == 4 and len(part) == 3
    assert all(row["lq"].shape == row["gt"].shape == (CROP, CROP, 3) for row in part)
    again = read_crops(read | {"limit": 3}, CROP)
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
