"""Restoration quality per CPU minute: pipelines trained as a user runs them, scored on real sets.

    .venv/bin/python benchmarks/quality.py [--pipelines quickstart cpu-3task] [--images 68]

Each pipeline is trained with ``allinone run`` (a fresh work directory, its own Ray session),
then its final model is scored by the evaluation suites on the real test sets beside the project
(``../shared/data/test``: CBSD68 at sigma 15/25/50, Rain100L, SOTS), on full images, beside the
classical baselines (TV, non-local means, dark channel prior) scored by the same code on the same
images. Printed per pipeline: wall time, steps, training samples/s, and per set PSNR/SSIM of the
model, of the input and of each baseline, with the model's margin over the best baseline.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, machine_use_reported, table

TEST_DATA = REPO.parent / "shared" / "data" / "test"


def train(pipeline: Path, workdir: Path) -> tuple[float, str]:
    """``allinone run`` as a user runs it; its wall time and its output."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "allinone", "run", str(pipeline), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{pipeline} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, done.stdout


def training_rate(workdir: Path) -> float:
    """Median of the samples/s every stage's rank 0 logged (steady state: after the first)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    rates = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            history = client.get_metric_history(run.info.run_id, "train/samples_per_s")
            rates += [m.value for m in sorted(history, key=lambda m: m.step)[1:]]
    return statistics.median(rates) if rates else float("nan")


def score(pipeline: Path, workdir: Path, images: int):
    """The run's final model on the real test sets; with the run's total steps."""
    from allinone.config import load_pipeline
    from allinone.curriculum.plan import plan_stages

    loaded = load_pipeline(pipeline)
    stages = plan_stages(loaded)
    weights = workdir / "stages" / stages[-1].name / "model.pt"
    return on_real_sets(loaded, weights, images), sum(s.steps for s in stages)


def on_real_sets(pipeline, weights: Path, images: int):
    """The all-in-one suite on the real test sets beside the project, with the baselines."""
    from allinone.evaluate.suites import EvalPlan, TaskEntry, run_suites

    plan = EvalPlan(
        model=pipeline.config.model_spec.load(weights),
        trained=tuple(pipeline.config.tasks),
        catalog={n: TaskEntry(t, pipeline.task_path(n)) for n, t in pipeline.tasks.items()},
        fresh=pipeline.config.model_spec.build,
        data=TEST_DATA,
        seed=pipeline.config.seed,
        max_images=images,
        tile=pipeline.config.eval.tile,
        baselines=True,
    )
    return run_suites(plan, ["all-in-one"])


def report(name: str, wall: float, steps: int, rate: float, results) -> None:
    rows_by_set: dict[tuple[str, str], dict[str, object]] = {}
    for row in results.rows:  # per set: the model's row and each baseline's, by method
        rows_by_set.setdefault((row.task, row.set), {})[row.method] = row
    baselines = sorted({r.method for r in results.rows} - {"model", "input"})
    rows = []
    for (task, name_of_set), entry in rows_by_set.items():
        model = entry["model"]
        others = {b: entry[b].psnr for b in baselines if b in entry}
        # The margin over the best classical method, or over the input where none applies.
        best = max(others, key=others.get) if others else "input"
        margin = model.psnr - (others[best] if others else model.input_psnr)
        rows.append(
            [
                task,
                name_of_set,
                model.images,
                f"{model.input_psnr:.2f}",
                f"{model.psnr:.2f}",
                f"{model.ssim:.4f}",
                *(f"{others[b]:.2f}" if b in others else "-" for b in baselines),
                f"{margin:+.2f} ({best})",
            ]
        )
    print(
        f"\n### {name}: {wall / 60:.1f} min wall (`allinone run`, shards and Ray start-up "
        f"included), {steps} steps, {rate:.1f} training samples/s\n"
    )
    headers = ["task", "set", "images", "input", "PSNR", "SSIM", *baselines, "margin"]
    print(table(headers, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", nargs="+", default=["quickstart", "cpu-3task"])
    parser.add_argument(
        "--images", type=int, default=68, help="per test set, first N (default: all of CBSD68)"
    )
    args = parser.parse_args()
    print(f"PSNR (dB) on full images of the real test sets, first {args.images} of each")
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as scratch:
        for name in args.pipelines:
            pipeline = REPO / "pipelines" / f"{name}.yaml"
            workdir = Path(scratch) / name
            wall, _ = train(pipeline, workdir)
            results, steps = score(pipeline, workdir, args.images)
            report(name, wall, steps, training_rate(workdir), results)


if __name__ == "__main__":
    with machine_use_reported():
        main()
