"""The published networks' `paper` presets training on one GPU: samples/s, peak memory, time to
the first step, for bf16 with ZeRO 0 and 2, channels_last and torch.compile on and off.

    .venv/bin/python benchmarks/gpu.py [--crop 128] [--batch 8] [--steps 20] [--budget 270]

Every configuration runs the platform's own engine (``allinone.train.loop``: the DeepSpeed
engine, its optimizer and schedule, the model's own objective) in this process, world size 1 on
NCCL, on random crops already on the GPU, so the figures are the network and the engine, not the
data stream. Ratios are against the first configuration of the same model, measured in the same
run. The whole run keeps to ``--budget`` seconds (default: under 5 minutes with start-up):
configurations left when it is spent are listed as skipped. On a machine without CUDA it stops at
once with one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

MODELS = ("promptir", "adair", "mioir_adaptive", "pip", "am_promptir")
# (zero stage, channels_last, compile): the first is each model's baseline.
BASE = (0, False, "off")
VARIANTS = ((2, False, "off"), (0, True, "off"), (0, False, "inductor"), (0, True, "inductor"))


@dataclass(frozen=True)
class Measured:
    model: str
    zero: int
    channels_last: bool
    compile: str
    first_step_s: float
    samples_per_s: float
    peak_gib: float


def main() -> None:
    args = _arguments()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here")
        sys.exit(1)
    _init_distributed()
    started = time.perf_counter()
    results, skipped = [], []
    for name in args.models:
        for zero, channels_last, compiled in (BASE, *VARIANTS):
            if time.perf_counter() - started > args.budget:
                skipped.append(f"{name} zero{zero} cl={channels_last} compile={compiled}")
                continue
            results.append(measure(name, zero, channels_last, compiled, args))
            print(_row(results[-1], results), flush=True)
    print(_table(results))
    if skipped:
        print(f"skipped (over the {args.budget:.0f} s budget): " + "; ".join(skipped))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps after 3 warm-up steps")
    parser.add_argument("--budget", type=float, default=270.0)
    return parser.parse_args()


def _init_distributed() -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)


def measure(name: str, zero: int, channels_last: bool, compiled: str, args) -> Measured:
    import deepspeed
    import torch

    from allinone.config import TrainSection
    from allinone.models.spec import ModelSpec
    from allinone.train.job import StageJob
    from allinone.train.loop import _engine, aux_weights
    from allinone.train.losses import total_loss

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train = TrainSection(
        precision="bf16", use_gpu=True, zero_stage=zero, channels_last=channels_last,
        compile=compiled, pixel_loss="l1",
    )  # fmt: skip
    job = StageJob(0, "gpu", args.steps + 3, ModelSpec(name, "paper"), train, args.batch, 0)
    begun = time.perf_counter()
    model = job.model.build().cuda()
    engine = _engine(deepspeed, model, train, job, world=1)
    if compiled != "off":
        engine.compile(backend=compiled)
    shape = (args.batch, 3, args.crop, args.crop)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    lq = torch.rand(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=memory)
    gt = torch.rand(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=memory)
    task = torch.arange(args.batch, device="cuda") % model.num_tasks
    weights = aux_weights(engine.module, {})
    first = None
    for step in range(args.steps + 3):
        if step == 3:
            torch.cuda.synchronize()
            timed = time.perf_counter()
        out = engine(lq, task, with_aux=True, target=gt)
        loss, _ = total_loss(out, gt.float(), task, train.pixel_loss, weights)
        engine.backward(loss)
        engine.step()
        if first is None:
            torch.cuda.synchronize()
            first = time.perf_counter() - begun
    torch.cuda.synchronize()
    rate = args.steps * args.batch / (time.perf_counter() - timed)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del engine, model
    return Measured(name, zero, channels_last, compiled, first, rate, peak)


def _row(m: Measured, results: list[Measured]) -> str:
    ratio = m.samples_per_s / next(r for r in results if r.model == m.model).samples_per_s
    return (
        f"| {m.model} | {m.zero} | {'on' if m.channels_last else 'off'} | {m.compile} | "
        f"{m.first_step_s:.1f} | {m.samples_per_s:.1f} | {ratio:.2f}x | {m.peak_gib:.1f} |"
    )


def _table(results: list[Measured]) -> str:
    header = (
        "| model | ZeRO | channels_last | compile | first step s | samples/s | vs base | peak GiB |"
        "\n|---|---:|---|---|---:|---:|---:|---:|"
    )
    return "\n".join([header, *(_row(r, results) for r in results)])


if __name__ == "__main__":
    main()
