"""The stage plan: which tasks each stage trains, for how long, and what it reads and scores.

``cumulative`` (MiOIR's sequential learning): stage k trains tasks 1..k from stage k-1's weights,
optimizer and schedule restarted. ``sequential``: only task k in stage k. ``mixed``: one stage with
every task for the whole budget, the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from allinone.config import Pipeline
from allinone.data.shards import shard_folder
from allinone.data.stream import StreamPlan, task_shards
from allinone.evaluate.scoring import TestSplit
from allinone.models.spec import ModelSpec


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    tasks: tuple[str, ...]  # trained in this stage
    steps: int
    offset: int = 0  # curriculum steps before this stage
    trains: str | None = None  # one component alone (the model's `trains` argument), or all

    def model_spec(self, pipeline: Pipeline) -> ModelSpec:
        """The network this stage trains: the pipeline's, told which component trains."""
        spec = pipeline.config.model_spec
        if self.trains is None:
            return spec
        overrides = {**spec.overrides, "trains": self.trains}
        return ModelSpec(spec.name, spec.preset, overrides, spec.task_names)


def plan_stages(pipeline: Pipeline) -> list[Stage]:
    """Components trained before the curriculum, its stages, then components trained after."""
    config = pipeline.config
    tasks, steps, mode = tuple(config.tasks), config.curriculum.steps, config.curriculum.mode
    if mode == "mixed":
        curriculum = [(None, tasks, steps[0], None)]  # one stage, named "mixed"
    else:
        curriculum = [
            (task, tasks[: k + 1] if mode == "cumulative" else (task,), steps[k], None)
            for k, task in enumerate(tasks)
        ]
    listed = config.curriculum.components  # each trains its component alone, on every task
    before = [(c.trains, tasks, c.steps, c.trains) for c in listed if c.before]
    after = [(c.trains, tasks, c.steps, c.trains) for c in listed if not c.before]
    stages, offset = [], 0
    for index, (label, trained, length, trains) in enumerate([*before, *curriculum, *after]):
        name = f"stage{index + 1}-{label}" if label else "mixed"
        stages.append(Stage(index, name, trained, length, offset, trains))
        offset += length
    return stages


def total_steps(pipeline: Pipeline) -> int:
    return sum(stage.steps for stage in plan_stages(pipeline))


def is_last(pipeline: Pipeline, stage: Stage) -> bool:
    return stage.offset + stage.steps == total_steps(pipeline)


def eval_splits(pipeline: Pipeline, shards: Path) -> tuple[TestSplit, ...]:
    """The test splits a worker scores every ``train.eval_every`` steps: every training task
    (all-in-one) and every unseen task (zero-shot), with the border each ignores."""
    config = pipeline.config
    suites = {"all-in-one": config.tasks, "zero-shot": config.unseen_tasks}
    return tuple(
        TestSplit(suite, task, shard_folder(shards, task, "test"), pipeline.tasks[task].crop_border)
        for suite, tasks in suites.items()
        for task in tasks
    )


def stage_plan(pipeline: Pipeline, shards: Path, stage: Stage):
    """The stage's stream: its tasks' training shards, mixed by weight, for its step budget."""
    config = pipeline.config
    ids = {name: i for i, name in enumerate(config.tasks)}
    return StreamPlan(
        tasks=tuple(
            task_shards(
                shard_folder(shards, t, "train"),
                t,
                ids[t],
                turns=pipeline.tasks[t].turns_in_training,
            )
            for t in stage.tasks
        ),
        weights=dict(config.curriculum.weights),
        crop=config.data.crop,
        samples=stage.steps * config.data.batch_size * config.train.num_workers,
        seed=config.seed + stage.index,
        crops_per_sample=config.data.crops_per_sample,
    )
