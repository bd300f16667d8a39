"""Training overhead: the platform's step (Ray Train + DeepSpeed ZeRO-2) against bare PyTorch.

    .venv/bin/python benchmarks/train_overhead.py [--quick] [--steps 30] [--crop 64] [--zero 2]

Both train promptir tiny on the same in-memory batch shape (8 x 3 x 64 x 64, uint8 crops made
once: no decoding), with the same loss (``allinone.train.losses.total_loss``, L1), AdamW, gradient
clipping 1.0 and the cosine LR schedule, on the same number of torch threads.

- platform: a ``TorchTrainer`` (one worker, gloo) running ``allinone.train.train_stage`` itself,
  the loop ``allinone run`` uses, fed by a materialised Ray Dataset of those crops. Timings come
  from inside the loop: the time each batch reaches ``_to_device`` and the time rank 0's logger
  is called after ``engine.step()``; the worker writes them to a file when the stage ends.
- bare: ``model(lq, task_id, with_aux=True)``, ``total_loss``, ``backward``, ``clip_grad_norm_``,
  ``AdamW.step`` and ``LambdaLR.step`` in this process.

The bare loop runs before and after the platform (their mean is the baseline). Prints, warm-up
steps excluded, the median compute per step (batch in hand -> optimizer stepped)
and the median whole step (including the wait for the next batch), the ratio platform / bare
(goal: at most 1.10x), the median CPU time of the training process (all its threads) per
compute (less sensitive than wall time to other jobs taking cores on a shared machine: a thread
waiting for a core spends no CPU), the thread counts each really ran with, and the start-up:
``trainer.fit()`` called -> the train function entered, its engine built, its first batch and first
step, and the last step -> ``fit()`` returning, for the session's first stage and for the next one
(a curriculum's next stage, a study's next trial).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# Before torch is imported: the bare loop runs with what allinone.cluster.ray.WORKER_ENV gives
# Ray workers.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import load_note, machine_use_reported, table  # noqa: E402
from allinone.config import TrainSection  # noqa: E402
from allinone.models.spec import ModelSpec  # noqa: E402
from allinone.train.job import StageJob  # noqa: E402
from allinone.train.loop import cosine_with_warmup  # noqa: E402

BATCH = 8
TASKS = ("denoise", "deblur", "derain")
POOL = 32  # distinct crops the batches are drawn from


def crops(crop: int, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "lq": rng.integers(0, 256, (count, crop, crop, 3), dtype=np.uint8),
        "gt": rng.integers(0, 256, (count, crop, crop, 3), dtype=np.uint8),
        "task_id": rng.integers(0, len(TASKS), count),
    }


# --------------------------------------------------------------------------- bare PyTorch
def bare_loop(train: TrainSection, crop: int, steps: int, warmup: int, threads: int) -> dict:
    from allinone.data.stream import to_model_batch
    from allinone.models import build
    from allinone.train.losses import total_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build("promptir", "tiny", task_names=TASKS)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(train, steps))
    data = {k: torch.from_numpy(v) for k, v in crops(crop, POOL).items()}
    timings, cpu = [], []
    for i in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        rows = slice((i * BATCH) % POOL, (i * BATCH) % POOL + BATCH)
        lq, gt, task_id = to_model_batch({k: v[rows] for k, v in data.items()})
        out = model(lq, task_id, with_aux=True)
        loss, _ = total_loss(out, gt, task_id, train.pixel_loss, train.aux_weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            timings.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    median = statistics.median(timings)
    return {
        "compute": median,
        "step": median,
        "cpu": statistics.median(cpu),
        "threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS", "unset"),
    }


# --------------------------------------------------------------------------- the platform
def _timed_stage(config: dict) -> None:
    """``train_stage`` with two clocks added: batch in hand, and step done (rank 0's logger)."""
    import allinone.train.loop as train_module

    record = {"entered": time.time(), "batch_at": [], "done_at": [], "cpu_at": []}
    record.update(threads=None, omp=None, engine_at=None)
    to_device, log = train_module._to_device, train_module.StepLogger.log
    engine = train_module._engine

    def timed_engine(*args, **kwargs):
        built = engine(*args, **kwargs)
        record["engine_at"] = time.time()
        return built

    def timed_to_device(*args, **kwargs):
        record["batch_at"].append(time.time())
        record["cpu_at"].append(time.process_time())
        record["threads"] = torch.get_num_threads()
        record["omp"] = os.environ.get("OMP_NUM_THREADS", "unset")
        return to_device(*args, **kwargs)

    def timed_log(self, *args, **kwargs):
        record["done_at"].append(time.time())
        record["cpu_at"].append(time.process_time())
        return log(self, *args, **kwargs)

    train_module._to_device, train_module.StepLogger.log = timed_to_device, timed_log
    train_module._engine = timed_engine
    try:
        train_module.train_stage(config)
    finally:
        train_module._to_device, train_module.StepLogger.log = to_device, log
        train_module._engine = engine
        Path(config["timings"]).write_text(json.dumps(record))


def platform_loop(
    train: TrainSection, crop: int, steps: int, warmup: int, scratch: Path, name: str
) -> dict:
    """One stage through a ``TorchTrainer`` built as ``allinone.curriculum.fit`` builds it
    (loopback process group, the stream's ``DataConfig``, Train's logging at WARNING)."""
    import ray.data
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from allinone.cluster.process_group import LoopbackTorchConfig
    from allinone.curriculum.fit import WORKER_RESOURCES
    from allinone.data.stream import train_data_config

    pool = crops(crop, POOL)
    rows = [{k: v[i % POOL] for k, v in pool.items()} for i in range((steps + warmup + 4) * BATCH)]
    dataset = ray.data.from_items(rows).materialize()  # in memory: no decoding during the steps
    timings = scratch / f"timings-{name}.json"
    job = StageJob(
        stage=0,
        stage_name="bench",
        steps=warmup + steps,
        model=ModelSpec("promptir", "tiny", task_names=tuple(TASKS)),
        train=train,
        batch_size=BATCH,
        seed=0,
        shuffle_rows=4 * BATCH,
    )
    trainer = TorchTrainer(
        functools.partial(_timed_stage, {"job": job, "timings": str(timings)}),
        torch_config=LoopbackTorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker=WORKER_RESOURCES),
        run_config=RunConfig(
            name=f"bench-train-overhead-{name}",
            storage_path=str(scratch / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": dataset},
        dataset_config=train_data_config(dataset, 1),
    )
    called = time.time()
    trainer.fit()
    returned = time.time()
    record = json.loads(timings.read_text())
    batch_at, done_at = record["batch_at"], record["done_at"]
    compute = [d - b for b, d in zip(batch_at, done_at, strict=False)][warmup:]
    whole = [b - a for a, b in zip(done_at, done_at[1:], strict=False)][warmup:]
    cpu_at = record["cpu_at"]  # batch in hand, step done, batch in hand, ...
    cpu = [done - got for got, done in zip(cpu_at[::2], cpu_at[1::2], strict=False)][warmup:]
    return {
        "compute": statistics.median(compute),
        "cpu": statistics.median(cpu),
        "step": statistics.median(whole),
        "threads": record["threads"],
        "omp": record["omp"],
        "entered": record["entered"] - called,
        "engine": record["engine_at"] - called,
        "first_batch": batch_at[0] - called,
        "first_step": done_at[0] - called,
        "closing": returned - done_at[-1],
    }


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--zero", type=int, default=2, help="DeepSpeed ZeRO stage")
    parser.add_argument("--quick", action="store_true", help="10 steps after 3 warm-up")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 10, 3

    from allinone.curriculum.run import start_ray

    # What the platform would run: one worker, ZeRO stage as asked, checkpoint only at the end.
    train = TrainSection(
        zero_stage=args.zero, num_workers=1, checkpoint_every=10**6, log_every=10**6
    )
    threads = train.threads_per_worker or max(1, (os.cpu_count() or 1))  # as train._set_threads
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        before = bare_loop(train, args.crop, args.steps, args.warmup, threads)
        start_ray(None)
        # The first stage of a session, then one more as a curriculum's next stage or a
        # study's next trial gets it: Ray's processes are started, its session is warm.
        platform = platform_loop(train, args.crop, args.steps, args.warmup, Path(scratch), "first")
        warm = platform_loop(train, args.crop, args.steps, args.warmup, Path(scratch), "next")
        after = bare_loop(train, args.crop, args.steps, args.warmup, threads)
    # The bare loop runs before and after the platform, so load drifting meanwhile hits both.
    bare = {**before, **{k: (before[k] + after[k]) / 2 for k in ("compute", "step", "cpu")}}

    print(
        f"\ntraining step, promptir tiny, batch {BATCH}x3x{args.crop}x{args.crop}, fp32, "
        f"median of {args.steps} steps after {args.warmup} warm-up; {load_note()}\n"
    )
    rows = []
    for name, result in (
        (f"Ray Train + DeepSpeed ZeRO-{args.zero} (train_stage)", platform),
        ("bare PyTorch loop", bare),
    ):
        rows.append(
            [
                name,
                f"{1000 * result['compute']:.0f}",
                f"{1000 * result['step']:.0f}",
                f"{result['compute'] / bare['compute']:.2f}x",
                f"{result['step'] / bare['step']:.2f}x",
                f"{1000 * result['cpu']:.0f}",
                f"{result['cpu'] / bare['cpu']:.2f}x",
                str(result["threads"]),
                str(result["omp"]),
            ]
        )
    print(
        table(
            [
                "loop",
                "compute ms/step",
                "whole step ms",
                "compute vs bare",
                "step vs bare",
                "CPU ms/step",
                "CPU vs bare",
                "torch threads",
                "OMP_NUM_THREADS",
            ],
            rows,
        )
    )
    print(
        f"\nbare loop before / after the platform: {1000 * before['compute']:.0f} / "
        f"{1000 * after['compute']:.0f} ms per step (the table uses their mean)"
    )
    print(
        "\nplatform start-up, seconds after trainer.fit() is called (goal: first step within 10 s)"
    )
    print(
        table(
            [
                "stage",
                "train function entered",
                "engine built",
                "first batch",
                "first step done",
                "last step -> fit() returns",
            ],
            [
                [label, *(f"{run[k]:.1f}" for k in STARTUP)]
                for label, run in (("first of the session", platform), ("next", warm))
            ],
        )
    )


STARTUP = ("entered", "engine", "first_batch", "first_step", "closing")


if __name__ == "__main__":
    with machine_use_reported():
        main()
