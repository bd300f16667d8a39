"""The training stream: each task's shards decoded, cropped, flipped and mixed by weight (Ray Data).

Reading a shard, decoding and cropping happen in the same Ray task (``from_items`` of shard
reads, a few to a task, ``flat_map`` to crops). The stock ``read_webdataset`` materialises every
full-size decoded image in the object store before the crop; measured on 2 cores it streams at
about 40% of this (``benchmarks/data_pipeline.py`` measures both). Only crop-sized uint8 arrays
travel.

A stage's whole step budget is planned as one pass over a shuffled list of shard reads, each task
given its weight's share of the samples: starting a Ray Data pass costs about a second, an epoch
loop would pay it again and again. Ray Data runs one task at a time until it knows the cluster's
CPUs (``PromptClusterLimits`` has it ask sooner), and the first read is cut in several small
tasks, so the first batch waits for neither (``group_reads``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from allinone.data import storage
from allinone.data.members import decode_member, member_size, pixel_pair
from allinone.data.shards import iter_tar_samples, read_manifest, shard_urls
from allinone.data.storage import StoragePath

SAFETY_MARGIN = 1.25  # plan a little more data than the budget: crops of tiny images can be fewer
READ_AHEAD_SHARDS = 16  # crops of this many whole shards cut ahead; see read_ahead_bytes
# Crops per block a read task sends on. Blocks of 16 halved the first batch's wait (0.27 s against
# 0.64) but cost 24% of the rate after it (benchmarks/data_pipeline.py): each block has a cost.
BLOCK_ROWS = 64
MAX_READS_PER_TASK = 4  # see group_reads
FIRST_READ_PARTS = 8  # see group_reads


@dataclass(frozen=True)
class TaskShards:
    name: str
    task_id: int
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    turns: bool = True  # 90-degree turns among the augmentations (TaskConfig.turns_in_training)

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
    # Random crops cut from each decoded shard sample: decoding a 256 px PNG pair costs most of a
    # sample's CPU, and a 64 px crop uses a sixteenth of it (BasicSR cuts sub-images for this).
    crops_per_sample: int = 1


def task_shards(
    folder: StoragePath, task: str, task_id: int, split: str = "train", turns: bool = True
) -> TaskShards:
    """A built task split's shards (via its manifest), in order."""
    urls = shard_urls(folder, task, split)  # raises a clear error when missing or incomplete
    manifest = read_manifest(folder, task, split) or {}
    counts = tuple(s["count"] for s in manifest["shards"] if s and s["count"])
    return TaskShards(task, task_id, tuple(urls), counts, turns)


def plan_reads(plan: StreamPlan) -> list[dict[str, Any]]:
    """Shard reads covering the budget (with ``SAFETY_MARGIN``), each task given its weight's
    share of the samples, shuffled. A read is ``{url, task_id, samples, limit, crops, turns,
    seed}``: it yields ``limit`` crops, ``crops`` from each of the shard's ``samples`` it decodes,
    turned by 90 degrees at random where ``turns``."""
    total_weight = sum(plan.weights.get(t.name, 1.0) for t in plan.tasks)
    rng = np.random.default_rng(plan.seed)
    reads = []
    for task in plan.tasks:
        share = plan.weights.get(task.name, 1.0) / total_weight
        wanted = math.ceil(plan.samples * share * SAFETY_MARGIN)
        reads += _task_reads(task, wanted, plan.crops_per_sample, rng)
    order = rng.permutation(len(reads))
    return [{**reads[i], "seed": int(plan.seed * 1_000_003 + n)} for n, i in enumerate(order)]


def _task_reads(
    task: TaskShards, wanted: int, crops: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Reads of one task holding exactly ``wanted`` crops, the last one cut to what is still
    wanted: planning in whole shards with a full pass per task turned a 9:1 mix at a small budget
    into 2:1. Each pass takes the shards in a fresh seeded order, so a share below one pass draws
    on any shard, not always the first ones."""
    reads = []
    while wanted > 0 and task.samples:
        for i in rng.permutation(len(task.urls)):
            count = task.counts[i]
            take = min(wanted, count * crops)
            reads.append(
                {
                    "url": task.urls[i],
                    "task_id": task.task_id,
                    "samples": count,
                    "limit": take,
                    "crops": crops,
                    "turns": task.turns,
                }
            )
            wanted -= take
            if not wanted:
                break
    return reads


def read_crops(read: dict[str, Any], crop: int) -> Iterator[dict[str, Any]]:
    """One shard read: ``limit`` crops, ``crops`` from each sample of a seeded random subset of
    its samples, each decoded once, randomly cropped, mirrored and turned, as uint8 HxWx3.
    Yielded as they are cut, so Ray Data can send a block on before the whole read is done.

    A sample's windows are drawn from its header before it is decoded, and only the rows down to
    the lowest window's last are decoded (``members.decode_member``): PNG rows decode in order,
    and a 96 px window of a 256 px image needs 69% of its rows on average."""
    crops, rng = planned_crops(read)
    last = max(crops, default=-1)
    for index, (key, members) in enumerate(iter_tar_samples(storage.path(read["url"]))):
        if index > last:
            break
        if index not in crops:
            continue
        name = f"{read['url']}:{key}"
        pair = pixel_pair(members, name)
        lq_name, gt_name = pair.names(name)
        height, width = member_size(pair.lq, pair.format, lq_name)
        padded = max(height, crop), max(width, crop)
        windows = [draw_window(*padded, crop, rng, read["turns"]) for _ in range(crops[index])]
        rows = max(window.top for window in windows) + crop
        lq = pad_to(decode_member(pair.lq, pair.format, lq_name, rows), crop)
        gt = pad_to(decode_member(pair.gt, pair.format, gt_name, rows), crop)
        for window in windows:
            lq_crop, gt_crop = window.cut(lq, crop), window.cut(gt, crop)
            yield {"lq": lq_crop, "gt": gt_crop, "task_id": read["task_id"]}


def planned_crops(read: dict[str, Any]) -> tuple[dict[int, int], np.random.Generator]:
    """Crops to cut from each sample a read decodes (by index in its shard), and the generator
    for their windows. A read with ``part: (i, n)`` is the i-th of n disjoint parts of that read
    (see ``group_reads``): every n-th of its samples, with the crops the whole read cuts there."""
    rng = np.random.default_rng(read["seed"])
    per_sample, limit = read["crops"], read["limit"]
    kept = sorted(_kept_indices(read["samples"], samples_kept(read), rng))
    crops = {index: min(per_sample, limit - n * per_sample) for n, index in enumerate(kept)}
    part, parts = read.get("part", (0, 1))
    if parts > 1:
        crops = {index: crops[index] for index in kept[part::parts]}
        rng = np.random.default_rng((read["seed"], part))
    return crops, rng


def read_task_crops(task: dict[str, Any], crop: int) -> Iterator[dict[str, Any]]:
    """One Ray task's shard reads, one after another (see ``group_reads``)."""
    for read in task["reads"]:
        yield from read_crops(read, crop)


def group_reads(reads: list[dict[str, Any]], parallel: int) -> list[dict[str, Any]]:
    """The pass's reads as Ray tasks of several consecutive reads, ``{"reads": [...]}``.

    A read task that ends leaves its core idle until Ray Data's scheduling loop sees it, and the
    loop waits up to 0.1 s for all running tasks at once: with one read per task that cost about
    a tenth of the cores. Tasks are sized as a guided schedule sizes loop chunks: the remaining
    reads over twice the tasks running at once, at most ``MAX_READS_PER_TASK``, so the pass
    ends on single reads, not on one long task with the other cores idle.

    The first read is cut into ``FIRST_READ_PARTS`` tasks (fewer for a read of fewer samples),
    each of every n-th of its samples. Ray's iterator hands a block on only once the next one has
    arrived, and all the tasks that first run at once are parts of that read, so the first batch
    waits for a small fraction of one read: on 2 cores (4 tasks at once) the first batch came
    after 0.47 s with two halves, 0.23 s with four parts and 0.19 s with eight (median of 6,
    one process, whole 500-sample passes of benchmarks/data_pipeline.py's shards)."""
    if not reads:
        return []
    first = reads[0]
    parts = max(1, min(FIRST_READ_PARTS, samples_kept(first)))
    tasks = [{"reads": [{**first, "part": (i, parts)}]} for i in range(parts)]
    start = 1
    while start < len(reads):
        size = min(MAX_READS_PER_TASK, math.ceil((len(reads) - start) / (2 * parallel)))
        tasks.append({"reads": reads[start : start + size]})
        start += size
    return tasks


def samples_kept(read: dict[str, Any]) -> int:
    """Samples a read decodes: enough to cut its ``limit`` crops, ``crops`` from each."""
    return min(read["samples"], math.ceil(read["limit"] / read["crops"]))


def _kept_indices(samples: int, limit: int, rng: np.random.Generator) -> set[int]:
    if limit >= samples:
        return set(range(samples))
    return {int(i) for i in rng.choice(samples, size=limit, replace=False)}


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad an image smaller than the crop (kept whole in its shard) up to the crop size."""
    h, w = image.shape[:2]
    if h >= size and w >= size:
        return image
    pad = ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0))
    mode = "reflect" if size - h < h and size - w < w else "symmetric"
    return np.pad(image, pad, mode=mode) if min(h, w) > 1 else np.pad(image, pad, mode="edge")


@dataclass(frozen=True)
class Window:
    """One random training crop: where it lies, and whether it is mirrored and turned."""

    top: int
    left: int
    mirrored: bool
    quarter_turns: int

    def cut(self, image: np.ndarray, crop: int) -> np.ndarray:
        image = image[self.top : self.top + crop, self.left : self.left + crop]
        if self.mirrored:
            image = image[:, ::-1]
        # A contiguous copy: torch refuses to wrap the read-only strided views rot90 and flips give.
        return np.ascontiguousarray(np.rot90(image, self.quarter_turns))


def draw_window(
    height: int, width: int, crop: int, rng: np.random.Generator, turns: bool = True
) -> Window:
    """A random window of an image of ``height`` x ``width``, mirrored at random, and (where
    ``turns``) turned by a random number of quarter turns."""
    top, left = int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
    mirrored = bool(rng.random() < 0.5)
    return Window(top, left, mirrored, int(rng.integers(0, 4)) if turns else 0)


def augment(
    lq: np.ndarray, gt: np.ndarray, crop: int, rng: np.random.Generator, turns: bool = True
):
    """The same random window, mirror and (where ``turns``) 90-degree turn on both sides."""
    window = draw_window(*lq.shape[:2], crop, rng, turns)
    return window.cut(lq, crop), window.cut(gt, crop)


def training_dataset(plan: StreamPlan):
    """The stage's Ray Dataset of ``{lq, gt: uint8 (crop, crop, 3), task_id: int}`` rows."""
    import ray.data

    tasks = group_reads(plan_reads(plan), _cluster_cpus())
    dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks)).flat_map(
        read_task_crops, fn_kwargs={"crop": plan.crop}
    )
    # Unbounded, Ray Data decodes the whole planned pass as fast as it can until its share of the
    # object store (GiBs) is full: on 2 cores, with a consumer taking 16 samples/s, the readers kept
    # 1-1.7 cores busy and the store grew 8-18 MiB/s for as long as it was watched, all of it taken
    # from training. Bounded, they decode about what training takes (benchmarks/data_pipeline.py).
    # Ray Train replaces a dataset's execution options with its DataConfig's: pass
    # ``train_data_config(dataset)`` as the TorchTrainer's ``dataset_config``.
    context = dataset.context
    # Blocks of at most BLOCK_ROWS crops: a read of several crops per sample (or of a big shard)
    # sends its first crops on before its last are cut.
    context.target_max_block_size = BLOCK_ROWS * crop_bytes(plan)
    limit = read_ahead_bytes(plan)
    context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
        object_store_memory=limit
    )
    context.custom_execution_callback_classes = [
        *context.custom_execution_callback_classes,
        IdleBackoff,
        PromptClusterLimits,
    ]
    return dataset


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


MIXED_READS = 8  # shard reads a worker's shuffle buffer mixes: a read is one task's samples


def shuffle_buffer_rows(plan: StreamPlan, batch_size: int) -> int:
    """Rows of a worker's local shuffle buffer: enough to hold ``MIXED_READS`` shard reads, so
    that a batch draws on several tasks. A read yields one shard of one task: with a buffer of
    a few batches, whole runs of batches came from a single task (on the quickstart, mixing
    eight reads lifted its final derain score by 0.6 dB at the same steps)."""
    return max(4 * batch_size, MIXED_READS * largest_read(plan))


class RampingShuffleBuffer:
    """A local shuffle buffer that serves its first batch as soon as it holds one, then grows to
    ``capacity`` rows, each batch it serves raising the fill it waits for by one batch.

    Ray's ``local_shuffle_buffer_size`` yields nothing until the buffer is full: at
    ``MIXED_READS`` shard reads, a stage's first batch waited for eight whole reads. Only the
    first ``capacity / batch_size`` batches draw on fewer reads. Rows are removed by moving the
    buffer's last rows into the drawn slots, so a batch costs its own rows' copies, not the
    buffer's."""

    def __init__(self, capacity: int, batch_size: int, seed: int) -> None:
        self.capacity, self.batch_size = max(capacity, batch_size), batch_size
        self.rng = np.random.default_rng(seed)
        self.columns: dict[str, np.ndarray] = {}
        self.size = 0
        self.served = 0

    def add(self, block: dict[str, np.ndarray]) -> None:
        rows = len(next(iter(block.values())))
        if not self.columns:
            self.columns = {k: np.empty((0, *v.shape[1:]), v.dtype) for k, v in block.items()}
        if self.size + rows > len(next(iter(self.columns.values()))):
            self._grow(self.size + rows)
        for key, column in self.columns.items():
            column[self.size : self.size + rows] = block[key]
        self.size += rows

    def ready(self) -> bool:
        wanted = min(self.capacity, self.batch_size * (1 + self.served))
        return self.size >= wanted

    def take(self) -> dict[str, np.ndarray]:
        """One batch of ``batch_size`` rows drawn at random from what the buffer holds."""
        drawn = self.rng.choice(self.size, size=self.batch_size, replace=False)
        batch = {key: column[drawn] for key, column in self.columns.items()}
        # Highest slot first: a slot that is itself among the last rows is moved before it is read.
        for slot in np.sort(drawn)[::-1]:
            self.size -= 1
            for column in self.columns.values():
                column[slot] = column[self.size]
        self.served += 1
        return batch

    def _grow(self, rows: int) -> None:
        capacity = max(rows, 2 * len(next(iter(self.columns.values()))))
        for key, column in self.columns.items():
            grown = np.empty((capacity, *column.shape[1:]), column.dtype)
            grown[: self.size] = column[: self.size]
            self.columns[key] = grown


def shuffled_batches(iterator, batch_size: int, buffer_rows: int, seed: int):
    """Full batches of uint8 tensors ``{lq, gt, task_id}`` from a Ray ``DataIterator``, mixed
    through a ``RampingShuffleBuffer`` of ``buffer_rows``; the pass's last partial batch is
    dropped, as ``drop_last`` does."""
    import torch

    def tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(column) for key, column in batch.items()}

    buffer = RampingShuffleBuffer(buffer_rows, batch_size, seed)
    # Ray's default prefetch of one block: without it a slow consumer (a training step) cost
    # 0.25 cores more of the machine (benchmarks/data_pipeline.py), though the first block came
    # sooner; group_reads cuts the first read in parts for that instead.
    for block in iterator.iter_batches(batch_size=None, batch_format="numpy"):
        buffer.add(block)
        while buffer.ready():
            yield tensors(buffer.take())
    while buffer.size >= batch_size:  # the pass has ended: what is left, in full batches
        yield tensors(buffer.take())


def train_data_config(dataset, workers: int = 1, name: str = "train"):
    """Ray Train's ``DataConfig`` that keeps the stream's read-ahead bound (``read_ahead_bytes``
    per Train worker): Train otherwise replaces a dataset's execution options with the driver's
    defaults, unbounded. Measured with one worker taking 16 samples/s: readers busy 1.7 cores and
    the object store growing 8 MiB/s without it; 0.3 cores and a flat store with it."""
    from ray.train import DataConfig

    options = copy.deepcopy(dataset.context.execution_options)
    limits = options.resource_limits
    options.resource_limits = limits.copy(object_store_memory=limits.object_store_memory * workers)
    # One worker reads the whole stream in its own process: a split would start a coordinator
    # actor (a process importing Ray Data) for every stage before the first batch can flow.
    split: list[str] | str = [] if workers == 1 else "all"
    return DataConfig(datasets_to_split=split, execution_options={name: options})


def read_ahead_bytes(plan: StreamPlan) -> int:
    """Object store Ray Data may fill ahead of the trainer: a crop for every sample of
    ``READ_AHEAD_SHARDS`` of the largest shards, however many crops a read cuts from a sample.

    Fewer rows than that held the read tasks back: with a consumer as fast as it can go, 256 rows
    gave 345 samples/s against 477 for 1,024 (4 crops a sample: 871 against 1,105), as Ray Data
    starts a task only where the bound has room for its output. More cost a training step the
    decoding of everything read ahead while it starts: at 4 crops a sample, 4,096 rows took
    1.11x the in-memory step over a stage's first 35 steps (benchmarks/data_pipeline.py)."""
    return READ_AHEAD_SHARDS * largest_shard(plan) * crop_bytes(plan)


def crop_bytes(plan: StreamPlan) -> int:
    return plan.crop * plan.crop * 3 * 2  # lq + gt, uint8


def largest_read(plan: StreamPlan) -> int:
    """Rows the largest shard read yields: a whole shard, ``crops_per_sample`` from each sample."""
    return largest_shard(plan) * plan.crops_per_sample


def largest_shard(plan: StreamPlan) -> int:
    """Samples in the plan's largest shard."""
    return max((count for task in plan.tasks for count in task.counts), default=1)


class IdleBackoff:
    """Sleep after each step of Ray Data's scheduling loop that came back at once having moved
    nothing: 1 ms, then twice as long each such step in a row, up to ``MAX_SLEEP_S``.

    Ray 2.60's loop blocks in ``ray.wait`` on its running tasks, but once the read-ahead bound
    holds them back their outputs are always "ready": the loop then spins about 1 ms a step and
    keeps a core busy (measured: 0.9 of one, in the SplitCoordinator that serves a Train worker,
    for as long as the trainer is slower than the readers). A fixed 50 ms sleep after every quick
    step stopped that, but also delayed the next read after one ended, when a quick step is the
    loop doing work: it cost the stream a tenth of its rate (benchmarks/data_pipeline.py).
    Implements Ray Data's ``ExecutionCallback`` interface by duck typing: its base class lives in
    a private module."""

    SPIN_S = 0.005  # a step this short waited for nothing
    FIRST_SLEEP_S = 0.001
    MAX_SLEEP_S = 0.05  # delays the loop's reaction to the trainer taking a block by at most this

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.sleep_s = self.FIRST_SLEEP_S
        self.moved = -1

    def before_execution_starts(self, executor) -> None:
        self.last = time.perf_counter()

    def on_execution_step(self, executor) -> None:
        now, moved = time.perf_counter(), _work_moved(executor)
        if moved != self.moved:
            self.moved, self.sleep_s = moved, self.FIRST_SLEEP_S
        elif now - self.last < self.SPIN_S:
            time.sleep(self.sleep_s)
            self.sleep_s = min(2 * self.sleep_s, self.MAX_SLEEP_S)
            now = time.perf_counter()
        self.last = now

    def after_execution_succeeds(self, executor) -> None:
        pass

    def after_execution_fails(self, executor, error: Exception) -> None:
        pass


class PromptClusterLimits:
    """Have Ray Data ask for the cluster's CPUs every ``POLL_S`` until it knows them.

    Ray Data 2.60 learns them from its autoscaling coordinator (an actor) with a call whose answer
    arrives after the execution has started, and asks again once a second: for the first second
    of every execution its limits are zero and it runs one task at a time (the pass's second read
    task started 1.05-1.4 s in; on 2 cores, a second of one idle core in every stage's stream).
    An ``ExecutionCallback`` by duck typing, as ``IdleBackoff``; the interval it shortens is the
    resource manager's own (``GLOBAL_LIMITS_UPDATE_INTERVAL_S``), for this execution only, and
    without that attribute it does nothing."""

    POLL_S = 0.02
    GIVE_UP_S = 5.0  # a cluster with no CPUs for Ray Data: stop asking early, Ray's interval then

    def __init__(self) -> None:
        self.manager, self.started = None, time.perf_counter()

    def before_execution_starts(self, executor) -> None:
        manager = getattr(executor, "_resource_manager", None)
        if manager is not None and hasattr(manager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S"):
            manager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = self.POLL_S  # shadows the class's 1 s
            self.manager, self.started = manager, time.perf_counter()

    def on_execution_step(self, executor) -> None:
        if self.manager is None:
            return
        known = self.manager.get_global_limits().cpu > 0
        if known or time.perf_counter() - self.started > self.GIVE_UP_S:
            del self.manager.GLOBAL_LIMITS_UPDATE_INTERVAL_S
            self.manager = None

    def after_execution_succeeds(self, executor) -> None:
        pass

    def after_execution_fails(self, executor, error: Exception) -> None:
        pass


def _work_moved(executor) -> int:
    """A count that grows whenever the loop submits a task or moves a block on; 0 where the
    executor does not show its operators (``_topology`` is the only view of them it has)."""
    topology = getattr(executor, "_topology", None) or {}
    return sum(
        op.metrics.num_tasks_submitted
        + op.metrics.num_task_outputs_generated
        + op.metrics.num_outputs_taken
        for op in topology
    )


def to_model_batch(batch: dict[str, Any], device: str = "cpu", dtype=None):
    """uint8 NHWC tensors from ``iter_torch_batches`` to float NCHW in [0, 1]."""
    import torch

    dtype = dtype or torch.float32

    def convert(images: torch.Tensor) -> torch.Tensor:
        return images.to(device).permute(0, 3, 1, 2).to(dtype).div_(255.0).contiguous()

    return convert(batch["lq"]), convert(batch["gt"]), batch["task_id"].to(device).long()
