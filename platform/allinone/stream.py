"""The training stream: each task's shards, decoded, cropped, flipped and mixed by weight, in Ray Data.

Reading a shard, decoding and cropping happen in ONE Ray task per shard (``from_items`` of shard
reads, ``flat_map`` to crops). The stock ``read_webdataset`` materialises every full-size decoded
image in the object store before the crop; measured on 2 cores it streams at about 40% of this
(DESIGN.md; ``benchmarks/data_pipeline.py`` measures both). Only crop-sized uint8 arrays travel.

A stage's whole step budget is planned as one pass over a shuffled list of shard reads, each task
read as often as its weight asks: starting a Ray Data pass costs about a second, an epoch loop
would pay it again and again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allinone.images import decode_image_bytes, to_uint8
from allinone.shards import iter_tar_samples, read_manifest

SAFETY_MARGIN = 1.25  # plan a little more data than the budget: crops of tiny images can be fewer


@dataclass(frozen=True)
class TaskShards:
    name: str
    task_id: int
    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def samples(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class StreamPlan:
    """Everything needed to build one stage's stream; plain data, picklable to the cluster."""

    tasks: tuple[TaskShards, ...]
    weights: dict[str, float]
    crop: int
    samples: int  # samples the stage consumes (steps x batch x workers)
    seed: int


def task_shards(folder: Path, task: str, task_id: int, split: str = "train") -> TaskShards:
    """A built task split's shards (via its manifest), in order."""
    from allinone.shards import shard_urls

    urls = shard_urls(folder, task, split)  # raises a clear error when missing or incomplete
    manifest = read_manifest(folder, task, split) or {}
    counts = tuple(s["count"] for s in manifest["shards"] if s and s["count"])
    return TaskShards(task, task_id, tuple(urls), counts)


def plan_reads(plan: StreamPlan) -> list[dict[str, Any]]:
    """Shard reads covering the budget, each task in proportion to its weight, shuffled."""
    total_weight = sum(plan.weights.get(t.name, 1.0) for t in plan.tasks)
    rng = np.random.default_rng(plan.seed)
    reads = []
    for task in plan.tasks:
        share = plan.weights.get(task.name, 1.0) / total_weight
        wanted = math.ceil(plan.samples * share * SAFETY_MARGIN)
        passes = max(1, math.ceil(wanted / max(task.samples, 1)))
        for _ in range(passes):
            reads += [{"url": url, "task_id": task.task_id} for url in task.urls]
    order = rng.permutation(len(reads))
    return [{**reads[i], "seed": int(plan.seed * 1_000_003 + n)} for n, i in enumerate(order)]


def read_crops(read: dict[str, Any], crop: int) -> list[dict[str, Any]]:
    """One shard read: every sample decoded, randomly cropped and flipped, as uint8 HxWx3."""
    rng = np.random.default_rng(read["seed"])
    rows = []
    for key, members in iter_tar_samples(Path(read["url"])):
        lq = decode_image_bytes(members["lq.png"], f"{read['url']}:{key}")
        gt = decode_image_bytes(members["gt.png"], f"{read['url']}:{key}")
        lq, gt = augment(pad_to(lq, crop), pad_to(gt, crop), crop, rng)
        rows.append({"lq": to_uint8(lq), "gt": to_uint8(gt), "task_id": read["task_id"]})
    return rows


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad an image smaller than the crop (kept whole in its shard) up to the crop size."""
    h, w = image.shape[:2]
    if h >= size and w >= size:
        return image
    pad = ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0))
    mode = "reflect" if size - h < h and size - w < w else "symmetric"
    return np.pad(image, pad, mode=mode) if min(h, w) > 1 else np.pad(image, pad, mode="edge")


def augment(lq: np.ndarray, gt: np.ndarray, crop: int, rng: np.random.Generator):
    """The same random window, flips and 90-degree turn on both sides of a pair."""
    h, w = lq.shape[:2]
    top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    lq, gt = lq[top : top + crop, left : left + crop], gt[top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        lq, gt = lq[:, ::-1], gt[:, ::-1]
    turns = int(rng.integers(0, 4))
    return np.rot90(lq, turns), np.rot90(gt, turns)


def training_dataset(plan: StreamPlan):
    """The stage's Ray Dataset of ``{lq, gt: uint8 (crop, crop, 3), task_id: int}`` rows."""
    import ray.data

    reads = plan_reads(plan)
    return ray.data.from_items(reads, override_num_blocks=len(reads)).flat_map(
        read_crops, fn_kwargs={"crop": plan.crop}
    )


def to_model_batch(batch: dict[str, Any], device: str = "cpu", dtype=None):
    """uint8 NHWC tensors from ``iter_torch_batches`` to float NCHW in [0, 1]."""
    import torch

    dtype = dtype or torch.float32

    def convert(images: torch.Tensor) -> torch.Tensor:
        return images.to(device).permute(0, 3, 1, 2).to(dtype).div_(255.0).contiguous()

    return convert(batch["lq"]), convert(batch["gt"]), batch["task_id"].to(device).long()


def describe(plan: StreamPlan) -> str:
    return json.dumps({t.name: {"shards": len(t.urls), "samples": t.samples} for t in plan.tasks})
