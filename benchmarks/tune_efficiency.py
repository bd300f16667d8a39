"""ASHA against full budgets: the same trials, stopped early or all run to the end.

    .venv/bin/python benchmarks/tune_efficiency.py [--trials 8] [--steps 120] [--quick]

Two studies of one search space on one local Ray session: ``scheduler: asha`` and ``fifo`` (every
trial to its full budget). Both use random search with the same seed, so they try the very same
configurations and the comparison isolates the scheduler (with TPE the second study would follow
other suggestions, because stopped trials report other values). Printed: trial-steps used, wall
time, the best metric each found, and the ratios. Goal: ASHA at most half the trial-steps, its
best within 0.2 dB of the full budgets' best.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import REPO, machine_use_reported, table

PIPELINE = """
name: tune-bench-{scheduler}
tasks_dir: {tasks}
tasks: [denoise, dehaze]
data: {{samples_per_shard: 32, crop: 48, batch_size: 8}}
model: {{name: promptir, preset: tiny}}
curriculum: {{mode: mixed, steps: [{steps}]}}
train: {{lr: 1.0e-3, warmup_steps: 10, zero_stage: 2, log_every: 1000}}
eval: {{max_images: 3}}
tune:
  search: random
  scheduler: {scheduler}
  num_samples: {trials}
  max_concurrent: 1
  eval_every: {every}
  asha: {{grace_steps: {every}}}  # reduction factor: the platform's default
  register_best: false
  space:
    train.lr: {{loguniform: [1.0e-5, 1.0e-2]}}
    model.prompt_len: {{choice: [3, 5, 7]}}
    model.prompt_dims: {{choice: [[8, 16, 32], [16, 32, 64]]}}
"""


def study(scheduler: str, folder: Path, trials: int, steps: int) -> dict:
    from allinone.config import load_pipeline
    from allinone.tune.study import StudyOptions, run_study

    path = folder / f"{scheduler}.yaml"
    path.write_text(
        PIPELINE.format(
            scheduler=scheduler,
            tasks=REPO / "tasks",
            steps=steps,
            trials=trials,
            every=max(1, steps // 6),
        )
    )
    started = time.perf_counter()
    result = run_study(load_pipeline(path), StudyOptions(folder / scheduler), say=lambda _: None)
    best = result.best()
    return {
        "trial_steps": result.trial_steps,
        "seconds": time.perf_counter() - started,
        "best": best.metric if best else float("nan"),
        "completed": sum(r.status == "completed" for r in result.rows),
        "values": sorted(str(r.values) for r in result.rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=120, help="curriculum steps of a trial")
    parser.add_argument("--quick", action="store_true", help="4 trials of 36 steps")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.steps = 4, 36

    from allinone.config import AshaSection
    from allinone.curriculum.run import start_ray

    start_ray(None)  # one session for both studies: neither pays Ray's start-up
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as scratch:
        asha = study("asha", Path(scratch), args.trials, args.steps)
        full = study("fifo", Path(scratch), args.trials, args.steps)
    assert asha["values"] == full["values"], "both studies must try the same configurations"
    rows = [
        ["ASHA", asha["completed"], asha["trial_steps"], asha["seconds"], f"{asha['best']:.2f}"],
        [
            "full budgets",
            full["completed"],
            full["trial_steps"],
            full["seconds"],
            f"{full['best']:.2f}",
        ],
    ]
    print(
        f"{args.trials} trials of promptir tiny, {args.steps} steps each at most, random search "
        "(same configurations in both), objective all-in-one/average_psnr, ASHA grace "
        f"{max(1, args.steps // 6)} steps, reduction factor {AshaSection().reduction_factor:g}\n"
    )
    print(table(["scheduler", "completed", "trial-steps", "wall s", "best dB"], rows))
    print(
        f"\nASHA / full: trial-steps {asha['trial_steps'] / full['trial_steps']:.2f}x, "
        f"wall time {asha['seconds'] / full['seconds']:.2f}x, "
        f"best metric {asha['best'] - full['best']:+.2f} dB "
        "(goal: at most 0.50x trial-steps, within 0.2 dB)"
    )


if __name__ == "__main__":
    with machine_use_reported():
        main()
