"""Model zoo on this machine's CPU: size of every preset, training speed of every tiny preset.

    .venv/bin/python benchmarks/models.py [--batch 4] [--crop 128] [--repeats 5]

Speed is one training forward + backward pass (the model's own objective, no optimizer) per
crop, the median of ``--repeats`` timed passes after warm-up, and throughput relative to promptir
tiny measured in the same run. The table of presets puts the official parameter count of each
published network beside ours.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import machine_use_reported
from allinone import models
from allinone.train.loop import aux_weights
from allinone.train.losses import total_loss

BASELINE = "promptir"


def parameters_of(name: str, preset: str) -> int:
    return models.parameter_counts(name, preset)[0]


def seconds_per_crop(name: str, batch: int, crop: int, warmup: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = models.build(name, "tiny").train()
    x, target = torch.rand(batch, 3, crop, crop), torch.rand(batch, 3, crop, crop)
    task = torch.arange(batch) % model.num_tasks
    timings = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        out = model(x, task, with_aux=True, target=target)
        total_loss(out, target, task, "l1", aux_weights(model, {}))[0].backward()
        if i >= warmup:
            timings.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(timings) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    names = sorted(models.MODELS)
    speed = {
        name: seconds_per_crop(name, args.batch, args.crop, args.warmup, args.repeats)
        for name in names
    }
    print(
        f"tiny presets, forward+backward, batch {args.batch} x {args.crop}x{args.crop}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print(f"| model | params | ms / crop | throughput vs {BASELINE} tiny |")
    print("|---|---:|---:|---:|")
    for name in names:
        params = parameters_of(name, "tiny")
        ratio = speed[BASELINE] / speed[name] if BASELINE in speed else float("nan")
        print(f"| {name} | {params:,} | {speed[name] * 1000:.1f} | {ratio:.2f}x |")

    print("\nparameters of every preset\n")
    print("| model | preset | params | official |")
    print("|---|---|---:|---:|")
    for name in names:
        official = models.MODELS[name].official
        for preset in models.MODELS[name].presets:
            params = parameters_of(name, preset)
            known = f"{official.parameters:,}" if official and official.preset == preset else ""
            print(f"| {name} | {preset} | {params:,} | {known} |")


if __name__ == "__main__":
    with machine_use_reported():
        main()
