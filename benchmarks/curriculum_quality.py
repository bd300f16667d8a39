"""MiOIR's claim at CPU scale: cumulative sequential learning against sequential and mixed.

    .venv/bin/python benchmarks/curriculum_quality.py [--pipeline pipelines/quickstart.yaml]
        [--steps 1800] [--images 12]

One pipeline's tasks, model, data and recipe, trained three times at the same total steps:
``cumulative`` (stage k replays tasks 1..k; MiOIR's sequential learning), ``sequential`` (stage k
trains task k only) and ``mixed`` (every task from step 0: the baseline MiOIR beats). Stage lengths
keep the pipeline's proportions. Each final model is scored on the real test sets beside the
project, beside the classical baselines; each curriculum's task x stage matrix (on the tasks'
test splits) gives its forgetting and backward transfer. Whatever wins is printed as it is.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from _common import REPO, machine_use_reported, table
from quality import on_real_sets

MODES = ("cumulative", "sequential", "mixed")


def variant(pipeline, mode: str, total: int):
    """The pipeline as ``mode`` with ``total`` steps, stages in the pipeline's proportions."""
    from allinone.config import Pipeline, PipelineConfig, validate

    config = pipeline.config
    if mode == "mixed":
        steps = [total]
    else:
        weights = config.curriculum.steps
        if len(weights) != len(config.tasks):  # a mixed pipeline: equal stages
            weights = [1] * len(config.tasks)
        steps = [round(total * w / sum(weights)) for w in weights]
        steps[-1] += total - sum(steps)
    data = config.model_dump(mode="json")
    data["name"] = f"{config.name}-{mode}"
    data["curriculum"] |= {"mode": mode, "steps": steps}
    return Pipeline(validate(PipelineConfig, data, pipeline.path), pipeline.path, pipeline.tasks)


def train_and_score(pipeline, workdir: Path, images: int) -> dict:
    from allinone.curriculum.run import run_pipeline
    from allinone.curriculum.state import RunOptions

    started = time.perf_counter()
    summary = run_pipeline(pipeline, RunOptions(workdir, register=False), say=lambda _: None)
    wall = time.perf_counter() - started
    results = on_real_sets(pipeline, summary.weights, images)
    return {"summary": summary, "results": results, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, default=REPO / "pipelines" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=None, help="total; default: the pipeline's")
    parser.add_argument("--images", type=int, default=12)
    args = parser.parse_args()

    from allinone.config import load_pipeline
    from allinone.curriculum.run import start_ray

    base = load_pipeline(args.pipeline)
    total = args.steps or sum(base.config.curriculum.steps)
    start_ray(None)  # one session for the three runs
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-curriculum-") as scratch:
        for mode in MODES:
            runs[mode] = train_and_score(
                variant(base, mode, total), Path(scratch) / mode, args.images
            )
    print_tables(base, total, runs, args.images)


def print_tables(base, total: int, runs: dict, images: int) -> None:
    first = runs[MODES[0]]["results"].rows
    sets = [(r.task, r.set) for r in first if r.method == "model"]
    inputs = {(r.task, r.set): r.input_psnr for r in first if r.method == "model"}
    baselines = sorted({r.method for r in first} - {"model", "input"})

    def psnr(column: str, key: tuple[str, str]) -> float | None:
        """A curriculum's model, or a baseline (scored once: the same images for all)."""
        rows, method = (
            (runs[column]["results"].rows, "model") if column in runs else (first, column)
        )
        found = [r.psnr for r in rows if (r.task, r.set) == key and r.method == method]
        return found[0] if found else None

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def mean(values: list[float | None]) -> float | None:
        return None if None in values else sum(values) / len(values)

    columns = [*MODES, *baselines]
    rows = [
        [t, n, cell(inputs[(t, n)]), *(cell(psnr(c, (t, n))) for c in columns)] for t, n in sets
    ]
    averages = ["average", "", cell(mean(list(inputs.values())))]
    averages += [cell(mean([psnr(c, k) for k in sets])) for c in columns]
    print(
        f"{base.config.model.name}/{base.config.model.preset}, "
        f"tasks {', '.join(base.config.tasks)}, {total} steps each; "
        f"PSNR (dB) on full images of the real test sets (first {images})\n"
    )
    print(table(["task", "set", "input", *columns], [*rows, averages]))
    print("\ncontinual view on the tasks' test splits (task x stage matrix of each curriculum)\n")

    def number(numbers: dict, key: str, sign: str = "") -> str:
        """One stage (mixed) has nothing to forget: no forgetting or transfer to show."""
        value = numbers.get(key, float("nan"))
        return "-" if math.isnan(value) else f"{value:{sign}.2f}"

    view = []
    for mode in MODES:
        numbers = runs[mode]["summary"]["continual"]
        view.append(
            [
                mode,
                number(numbers, "continual/average_psnr"),
                number(numbers, "continual/forgetting"),
                number(numbers, "continual/bwt", "+"),
                f"{runs[mode]['wall'] / 60:.1f}",
            ]
        )
    print(table(["curriculum", "final average", "forgetting", "backward transfer", "min"], view))


if __name__ == "__main__":
    with machine_use_reported():
        main()
