"""Scoring a curriculum's weights: every trained task's test split at each stage end, and the
pipeline's evaluation suites on the final weights."""

from __future__ import annotations

from pathlib import Path

from allinone.config import Pipeline, resolve_source
from allinone.data.shards import shard_folder
from allinone.evaluate.grids import log_grid
from allinone.evaluate.scoring import TaskScore, score_task_with_sample
from allinone.evaluate.suites import MODEL, EvalPlan, Results, TaskEntry, log_results, run_suites
from allinone.evaluate.testsets import discover


def score_stage(
    pipeline: Pipeline, shards: Path, weights: Path, grid_runs: list[str]
) -> dict[str, TaskScore]:
    """Every trained task's test split; each task's grid goes to the stage run and the parent
    run (where the last stage's grids stay, for the run's report)."""
    model = pipeline.config.model_spec.load(weights)
    settings = pipeline.config.eval
    scores = {}
    for task in pipeline.config.tasks:
        scores[task], sample = score_task_with_sample(
            model,
            shard_folder(shards, task, "test"),
            task,
            settings.max_images,
            settings.tile,
            pipeline.tasks[task].crop_border,
        )
        for run_id in grid_runs if settings.grids else []:
            log_grid(sample, task, f"{task}: test split", run_id=run_id)
    return scores


def check_eval_data(pipeline: Pipeline) -> None:
    """Fail before training, not after it, when ``eval.data`` holds no test set we know."""
    if pipeline.config.eval.data:
        discover(Path(eval_data(pipeline)))


def eval_data(pipeline: Pipeline) -> Path:
    return Path(
        resolve_source(pipeline.config.eval.data, pipeline.folder, pipeline.path, "eval.data")
    )


def evaluate_run_end(pipeline: Pipeline, shards: Path, weights: Path | None, say=print):
    """The pipeline's configured suites on its final weights, logged to the active run.

    Stage ends already scored every trained task's synthetic split, so all-in-one runs again
    only when real test sets are configured (``eval.data``)."""
    settings = pipeline.config.eval
    suites = [s for s in settings.suites if s != "all-in-one" or settings.data]
    if weights is None or not suites:
        return None
    spec = pipeline.config.model_spec
    plan = EvalPlan(
        model=spec.load(weights),
        trained=tuple(pipeline.config.tasks),
        catalog={n: TaskEntry(t, pipeline.task_path(n)) for n, t in pipeline.tasks.items()},
        unseen_tasks=tuple(pipeline.config.unseen_tasks),
        fresh=spec.build,
        data=eval_data(pipeline) if settings.data else None,
        seed=pipeline.config.seed,
        max_images=settings.max_images,
        tile=settings.tile,
        baselines=settings.baselines,
        few_shot=settings.few_shot,
        shards=lambda task: _built(shard_folder(shards, task, "test")),
        say=say,
    )
    results: Results = run_suites(plan, suites)
    log_results(results, settings.grids)
    for row in results.rows:
        if row.method == MODEL:
            say(
                f"{row.suite}: {row.task} on {row.set}: {row.psnr:.2f} dB, SSIM {row.ssim:.4f} "
                f"(input {row.input_psnr:.2f} dB, {row.images} images)"
            )
    for name, value in results.averages().items():
        say(f"{name}: average PSNR {value:.2f} dB")
    return results


def _built(folder: Path) -> Path | None:
    """A task's test shards when a build finished there (a task without a test split has none)."""
    return folder if (folder / "manifest.json").is_file() else None
