"""Training data: the platform's Ray Data stream against a plain WebDataset + DataLoader pipeline.

    .venv/bin/python benchmarks/data_pipeline.py [--quick] [--samples 2000] [--crop 96] [--steps 30]

Builds three tasks' shards (denoise, deblur, derain from tasks/*.yaml) from the clean photos in
../shared/data/train/CSun_Hays80, once with PNG members and once with .npy members, then streams
batches of 8 random crops (decode, crop, flip, 90-degree turn) six ways, each with 2 processes
doing the data work where it can say so:

- ``allinone.data.stream``: ``training_dataset(StreamPlan)`` (Ray tasks of a few shard reads
  each) iterated through ``shuffled_batches`` with the stage's ``shuffle_buffer_rows``, as a lone
  Ray Train worker gets it;
- the same with ``crops_per_sample=4`` (``data.crops_per_sample``): four random crops cut from each
  decoded pair, the decode (most of a sample's CPU) shared by four samples;
- plain: ``webdataset.WebDataset(urls)`` + ``torch.utils.data.DataLoader(num_workers=2)``;
- the stream and the plain loader again on the same samples built with ``.npy`` members
  (``train.members: npy``, as the tasks' training splits are): no PNG decode at all;
- stock Ray Data: ``ray.data.read_webdataset(urls)`` + ``map_batches(crop)``, for reference.

Table 1 (one planned pass of about 1.25 x ``--samples``, after an untimed warm-up pass that lets
Ray start its worker processes): time to the first batch, samples/s after it and the ratio to the
plain pipeline (goal: the Ray stream at least matches it), samples/s over the whole pass with
its start included (what a short pass really gets; a stage streams as one long pass), CPU ms
per sample of every process
involved (this process, its DataLoader workers, its Ray session) and cores other processes used.
Table 2: a training loop on the tiny PromptIR (Adam step per batch) fed by each pipeline planned
for a whole stage (``--stage-samples``): time blocked in ``next(iterator)`` against compute
(goal: under 5% of the step for the Ray stream), the step against the same loop on one in-memory
batch in the same round (the data work shares the 2 cores with training; goal 1.02x; ``--rounds``
alternate the loops' order, median and each round's ratio printed), and CPU seconds per step of
everything.
Ray is started with ``allinone.curriculum.run.start_ray(None)``, as ``allinone run`` starts it.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

# Before torch is imported: idle OpenMP threads must sleep, not spin, while data workers share the
# cores (conftest.py and allinone.cluster.ray.WORKER_ENV do the same; spinning made training 6-9x
# slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from _common import REPO, CpuWindow, load_note, photo_folder, table  # noqa: E402
from allinone.config import load_task  # noqa: E402
from allinone.data.shards import BuildRequest, build_shards  # noqa: E402
from allinone.data.stream import (  # noqa: E402
    StreamPlan,
    TaskShards,
    augment,
    shuffle_buffer_rows,
    shuffled_batches,
    task_shards,
    to_model_batch,
    training_dataset,
)

TASKS = ("denoise", "deblur", "derain")
BATCH = 8
MULTI_CROP = 4  # data.crops_per_sample of the stream's second row
WORKERS = 2


# --------------------------------------------------------------------------- data
def build_task_shards(
    scratch: Path, photos: int, variants: int, per_shard: int, members: str = "png"
) -> list[TaskShards]:
    source = photo_folder(scratch / "photos", photos)
    shards = []
    for task_id, name in enumerate(TASKS):
        task = load_task(REPO / "tasks" / f"{name}.yaml")
        train = task.train.model_copy(update={"variants": variants, "members": members})
        task = task.model_copy(update={"train": train})
        out = scratch / "shards" / members / name
        build_shards(BuildRequest(task, "train", str(source), out, per_shard), workers=WORKERS)
        shards.append(task_shards(out, name, task_id))
    return shards


def ray_stream(tasks: list[TaskShards], crop: int, samples: int, seed: int = 0, crops: int = 1):
    """As one Ray Train worker gets it: the whole dataset's iterator (``train_data_config``
    splits only among several workers), mixed through the stage's shuffle buffer."""
    plan = StreamPlan(tuple(tasks), {}, crop, samples, seed, crops_per_sample=crops)
    rows = shuffle_buffer_rows(plan, BATCH)
    batches = shuffled_batches(training_dataset(plan).iterator(), BATCH, rows, seed)
    return ((b["lq"], b["gt"], b["task_id"]) for b in batches)


def _passes(tasks: list[TaskShards], samples: int) -> list[tuple[str, int]]:
    """Every task's shards, repeated so one pass covers ``samples`` (with the stream's margin)."""
    per_task = samples * 1.25 / len(tasks)
    return [
        (url, t.task_id)
        for t in tasks
        for _ in range(max(1, int(np.ceil(per_task / t.samples))))
        for url in t.urls
    ]


def _decode_rgb8(sample: dict, side: str) -> np.ndarray:
    """What a plain WebDataset pipeline does with a member: PIL for a PNG, NumPy for an array."""
    if f"{side}.npy" in sample:
        return np.load(io.BytesIO(sample[f"{side}.npy"]), allow_pickle=False)
    with Image.open(io.BytesIO(sample[f"{side}.png"])) as image:
        return np.asarray(image.convert("RGB"))


class _PlainCrop:
    """The plain pipeline's per-sample work: decode to uint8, then the stream's own augment."""

    def __init__(self, crop: int, ids: dict[str, int]) -> None:
        self.crop, self.ids, self.rng = crop, ids, None

    def __call__(self, sample: dict) -> tuple[np.ndarray, np.ndarray, int]:
        if self.rng is None:  # one generator per DataLoader worker process
            self.rng = np.random.default_rng(torch.utils.data.get_worker_info().seed % 2**32)
        lq, gt = _decode_rgb8(sample, "lq"), _decode_rgb8(sample, "gt")
        lq, gt = augment(lq, gt, self.crop, self.rng)
        return np.ascontiguousarray(lq), np.ascontiguousarray(gt), self.ids[sample["__url__"]]


def plain_loader(tasks: list[TaskShards], crop: int, samples: int):
    import webdataset as wds

    reads = _passes(tasks, samples)
    urls = [url for url, _ in reads]
    dataset = wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False, seed=0).map(
        _PlainCrop(crop, dict(reads))
    )
    return iter(torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS))


def _stock_crop(crop: int, ids: dict[str, int]):
    rng = np.random.default_rng(0)

    def crop_batch(batch: dict) -> dict:
        pairs = [
            augment(lq, gt, crop, rng)
            for lq, gt in zip(batch["lq.png"], batch["gt.png"], strict=True)
        ]
        return {
            "lq": np.stack([lq for lq, _ in pairs]),
            "gt": np.stack([gt for _, gt in pairs]),
            "task_id": np.array([ids[m["task"]] for m in batch["json"]]),
        }

    return crop_batch


def stock_ray(tasks: list[TaskShards], crop: int, samples: int):
    import ray.data

    urls = [url for url, _ in _passes(tasks, samples)]
    ids = {t.name: t.task_id for t in tasks}
    ds = ray.data.read_webdataset(urls, shuffle="files").map_batches(_stock_crop(crop, ids))
    batches = ds.iter_torch_batches(batch_size=BATCH, drop_last=True)
    return ((b["lq"], b["gt"], b["task_id"]) for b in batches)


# name: (pipeline, the shards' members)
PIPELINES = {
    "allinone.data.stream (Ray Data)": (ray_stream, "png"),
    "allinone.data.stream, npy members": (ray_stream, "npy"),
    f"allinone.data.stream, {MULTI_CROP} crops per pair": (
        functools.partial(ray_stream, crops=MULTI_CROP),
        "png",
    ),
    "plain WebDataset + DataLoader": (plain_loader, "png"),
    "plain WebDataset + DataLoader, npy members": (plain_loader, "npy"),
    "stock ray.data.read_webdataset": (stock_ray, "png"),
}
BASELINE = "plain WebDataset + DataLoader"
FED = [name for name in PIPELINES if not name.startswith("stock")]  # pipelines of table 2


# --------------------------------------------------------------------------- throughput
def throughput(make, tasks, crop: int, samples: int) -> dict[str, float]:
    """One whole planned pass, from building the pipeline to its last batch."""
    seen = 0
    with CpuWindow() as window:
        batches = make(tasks, crop, samples)
        for lq, gt, task_id in batches:
            to_model_batch({"lq": lq, "gt": gt, "task_id": task_id})  # as the trainer does
            if not seen:
                first = time.perf_counter()
            seen += lq.shape[0]
        del batches
    first_wall = first - window.started
    return {
        "first": first_wall,
        "rate": (seen - BATCH) / (window.wall - first_wall),
        "overall": seen / window.wall,
        "cpu": window.cpu / seen,
        "others": window.others,
        "samples": seen,
    }


# --------------------------------------------------------------------------- training loop
def _model_and_step():
    from allinone.models import build
    from allinone.train.losses import total_loss

    torch.manual_seed(0)
    model = build("promptir", "tiny")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)

    def step(lq: torch.Tensor, gt: torch.Tensor, task_id: torch.Tensor) -> None:
        lq, gt, task_id = to_model_batch({"lq": lq, "gt": gt, "task_id": task_id})
        loss, _ = total_loss(model(lq, task_id, with_aux=True), gt, task_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training_wait(make, tasks, crop: int, steps: int, warmup: int, stage: int) -> dict[str, float]:
    """Mean seconds per step blocked on data and computing, and CPU seconds per step of every
    process (training and data), warm-up steps excluded. The pipeline plans a whole stage of
    ``stage`` samples, as a real stage does, so any reading ahead happens during the steps."""
    step = _model_and_step()
    batches = make(tasks, crop, stage) if make else _same_batch(crop)
    for _ in range(warmup):
        step(*next(batches))
    wait = 0.0
    with CpuWindow() as window:
        for _ in range(steps):
            start = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - start
            step(*batch)
    del batches
    return {
        "wait": wait / steps,
        "compute": (window.wall - wait) / steps,
        "cpu": window.cpu / steps,
        "others": window.others,
    }


def _same_batch(crop: int):
    generator = torch.Generator().manual_seed(0)
    batch = tuple(
        torch.randint(0, 256, (BATCH, crop, crop, 3), dtype=torch.uint8, generator=generator)
        for _ in range(2)
    )
    return itertools.repeat((*batch, torch.zeros(BATCH, dtype=torch.long)))


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=16)
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=64)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--samples", type=int, default=2000, help="per throughput measurement")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per pipeline")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--stage-samples",
        type=int,
        default=20000,
        help="samples the training measurement's stage is planned for",
    )
    parser.add_argument("--repeats", type=int, default=2, help="throughput passes per pipeline")
    parser.add_argument("--rounds", type=int, default=2, help="training loops per pipeline")
    parser.add_argument("--quick", action="store_true", help="800 samples, 1 repeat, 15 steps")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeats, args.steps, args.warmup, args.rounds = 800, 1, 15, 3, 1

    from allinone.curriculum.run import start_ray

    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        shards = {
            members: build_task_shards(
                Path(scratch), args.photos, args.variants, args.samples_per_shard, members
            )
            for members in ("png", "npy")
        }
        tasks = shards["png"]
        start_ray(None)
        print(
            f"data pipelines: {len(tasks)} tasks, {sum(len(t.urls) for t in tasks)} shards, "
            f"{sum(t.samples for t in tasks)} samples of 256x256 pairs (PNG and npy builds); "
            f"batch {BATCH}, crop {args.crop}, {WORKERS} worker processes; "
            f"torch {torch.get_num_threads()} threads; {load_note()}\n"
        )
        cold = {
            name: throughput(make, shards[members], args.crop, 4 * BATCH)["first"]
            for name, (make, members) in PIPELINES.items()
        }  # warm-up: Ray starts its worker processes
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in PIPELINES}
        for r in range(args.repeats):
            for name in PIPELINES if r % 2 == 0 else reversed(PIPELINES):
                make, members = PIPELINES[name]
                runs[name].append(throughput(make, shards[members], args.crop, args.samples))
        med = {
            name: {k: statistics.median(run[k] for run in results) for k in results[0]}
            for name, results in runs.items()
        }
        rows = [
            [
                name,
                f"{cold[name]:.2f}",
                f"{m['first']:.2f}",
                m["rate"],
                f"{m['rate'] / med[BASELINE]['rate']:.2f}x",
                m["overall"],
                f"{m['overall'] / med[BASELINE]['overall']:.2f}x",
                f"{1000 * m['cpu']:.1f}",
                f"{m['others']:.2f}",
            ]
            for name, m in med.items()
        ]
        print(
            f"one planned pass of about {args.samples * 1.25:.0f} samples, median of "
            f"{args.repeats}\n"
        )
        print(
            table(
                [
                    "pipeline",
                    "first batch, cold s",
                    "first batch s",
                    "samples/s after it",
                    "vs plain",
                    "samples/s whole pass",
                    "vs plain",
                    "CPU ms/sample",
                    "others' cores",
                ],
                rows,
            )
        )

        print_training_table(args, shards)


ALONE = "in-memory batch (no pipeline)"


def print_training_table(args: argparse.Namespace, shards: dict[str, list[TaskShards]]) -> None:
    """Table 2: each pipeline's fed step against the in-memory step of the same round. Rounds
    run every loop in turn, the order reversed each round, so drift hits all alike; an hour's
    swing between loops of one round is a few percent, which is what the ratios are about."""
    loops = {ALONE: (None, "png")} | {name: PIPELINES[name] for name in FED}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in loops}
    for r in range(args.rounds):
        for name in loops if r % 2 == 0 else reversed(loops):
            make, members = loops[name]
            rounds[name].append(
                training_wait(
                    make, shards[members], args.crop, args.steps, args.warmup, args.stage_samples
                )
            )
    rows = []
    for name, results in rounds.items():
        ratios = [
            (r["wait"] + r["compute"]) / (alone["wait"] + alone["compute"])
            for r, alone in zip(results, rounds[ALONE], strict=True)
        ]
        mid = {k: statistics.median(r[k] for r in results) for k in results[0]}
        rows.append(
            [
                name,
                f"{1000 * mid['wait']:.1f}",
                f"{1000 * mid['compute']:.0f}",
                f"{100 * mid['wait'] / (mid['wait'] + mid['compute']):.1f}%",
                f"{statistics.median(ratios):.2f}x",
                " ".join(f"{x:.2f}" for x in ratios),
                f"{mid['cpu']:.2f}",
                f"{mid['others']:.2f}",
            ]
        )
    print(
        f"\ntraining promptir tiny, Adam, batch {BATCH}x3x{args.crop}x{args.crop}, "
        f"{torch.get_num_threads()} torch threads: means over {args.steps} steps after "
        f"{args.warmup} warm-up, in a stage planned for {args.stage_samples} samples; "
        f"median of {args.rounds} rounds\n"
    )
    headers = ["pipeline", "data wait ms/step", "compute ms/step", "wait / step"]
    headers += ["step vs in-memory", "each round", "CPU s/step (all)", "others' cores"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
