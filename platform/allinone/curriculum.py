"""The main job: a curriculum of stages, each a Ray Train + DeepSpeed fit, evaluated and tracked.

``cumulative`` (MiOIR's sequential learning): stage k trains tasks 1..k from stage k-1's weights,
optimizer and schedule restarted. ``sequential``: only task k in stage k. ``mixed``: one stage with
every task for the whole budget, the baseline. After every stage each task's test split is scored,
so the run ends with a task x stage PSNR matrix.

The work directory holds everything a run needs to continue: shards, Ray Train's checkpoints, each
finished stage's weights and ``state.json``. ``--resume`` skips finished stages and restarts the
unfinished one from its last checkpoint (Ray Train restores a run of the same name and storage).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from allinone.config import Pipeline, resolve_source
from allinone.shards import BuildRequest, build_shards
from allinone.stream import shuffle_buffer_rows, train_data_config, training_dataset
from allinone.train import NONFINITE_FILE, STATE_FILE, WEIGHTS_FILE, StageJob, job_dict

STATE = "state.json"


class CurriculumError(RuntimeError):
    """A stage that cannot continue; the message says which and why."""


@dataclass(frozen=True)
class RunOptions:
    """How one curriculum runs: where, tracked where, and what a caller (a study) adds."""

    workdir: Path
    tracking_uri: str | None = None
    address: str | None = None
    resume: bool = False
    register: bool = True
    fault: dict[str, Any] | None = None  # test hook: kill a worker once at a step
    shards: Path | None = None  # shards built beforehand (a study's trials share them)
    parent_run_id: str | None = None  # nest the curriculum's MLflow run under this one
    tags: dict[str, str] = field(default_factory=dict)  # set on the curriculum's MLflow run
    train_callbacks: tuple[Any, ...] = ()  # Ray Train callbacks, e.g. Tune's reporting one
    # The curriculum's last scores are the caller's to report (a study's trial reports them once
    # the run has ended, so that a scheduler stopping at its final step cannot cut the end short).
    hold_final_scores: bool = False

    @property
    def shard_root(self) -> Path:
        return (self.shards or self.workdir / "shards").resolve()


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    tasks: tuple[str, ...]  # trained in this stage
    steps: int
    offset: int = 0  # curriculum steps before this stage


def plan_stages(pipeline: Pipeline) -> list[Stage]:
    config = pipeline.config
    tasks, steps, mode = config.tasks, config.curriculum.steps, config.curriculum.mode
    if mode == "mixed":
        return [Stage(0, "mixed", tuple(tasks), steps[0])]
    stages = []
    for k, task in enumerate(tasks):
        trained = tuple(tasks[: k + 1]) if mode == "cumulative" else (task,)
        stages.append(Stage(k, f"stage{k + 1}-{task}", trained, steps[k], sum(steps[:k])))
    return stages


def total_steps(pipeline: Pipeline) -> int:
    return sum(stage.steps for stage in plan_stages(pipeline))


def _is_last(pipeline: Pipeline, stage: Stage) -> bool:
    return stage.offset + stage.steps == total_steps(pipeline)


# --------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """What a work directory remembers between driver processes."""

    pipeline: str
    parent_run_id: str | None = None
    stage_runs: dict[str, str] = field(default_factory=dict)  # stage name -> MLflow run id
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> weights, scores
    attempt: str = ""  # suffix of Ray Train run names; a fresh run never picks up old checkpoints

    @classmethod
    def open(cls, workdir: Path, pipeline: Pipeline, resume: bool) -> RunState:
        path = workdir / STATE
        if not path.is_file():
            return cls(pipeline=pipeline.config.name, attempt=os.urandom(4).hex())
        if not resume:
            raise CurriculumError(
                f"{workdir} holds an earlier run of {pipeline.config.name}: "
                "pass --resume to continue it, or choose another --workdir"
            )
        state = cls(**json.loads(path.read_text()))
        if state.pipeline != pipeline.config.name:
            raise CurriculumError(
                f"{path}: belongs to pipeline {state.pipeline!r}, not {pipeline.config.name!r}"
            )
        return state

    def save(self, workdir: Path) -> None:
        write_atomic(workdir / STATE, json.dumps(asdict(self), indent=2))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- data
def shard_folder(shards: Path, task: str, split: str) -> Path:
    """A task split's folder under a shard root (``<workdir>/shards`` unless given)."""
    return shards / task / split


def prepare_shards(pipeline: Pipeline, shards: Path, workers: int = 2, on_build=print) -> None:
    """Build (or resume) every task's train and test shards under the shard root."""
    config = pipeline.config
    for (name, split), source in shard_sources(pipeline).items():
        request = BuildRequest(
            pipeline.tasks[name],
            split,
            str(source),
            shard_folder(shards, name, split),
            config.data.samples_per_shard,
            config.seed,
        )
        manifest = build_shards(request, workers=workers)
        on_build(f"shards {name}/{split}: {manifest['samples']} samples")


def shard_sources(pipeline: Pipeline) -> dict[tuple[str, str], str | Path]:
    """Every task split's source, resolved: ``"skimage"`` or an existing folder. A missing one
    raises the ConfigError naming the file and field that gave it."""
    sources = {}
    for name in pipeline.tasks:
        for split in ("train", "test"):
            source, origin, field_name = _split_source(pipeline, name, split)
            sources[name, split] = resolve_source(source, origin.parent, origin, field_name)
    return sources


def _split_source(pipeline: Pipeline, task: str, split: str):
    """Where a task's split comes from, with the config field that said so (for errors)."""
    data = pipeline.config.data
    per_task = data.train_sources if split == "train" else data.test_sources
    if task in per_task:
        return per_task[task], pipeline.path, f"data.{split}_sources.{task}"
    shared = data.train_source if split == "train" else data.test_source
    if shared and pipeline.tasks[task].kind == "synthetic":  # a photo folder holds no pairs
        return shared, pipeline.path, f"data.{split}_source"
    source = pipeline.tasks[task].split(split).source
    path = pipeline.task_path(task)
    if source is None:
        from allinone.config import ConfigError

        raise ConfigError(path, f"{split}.source", "no source configured for this split")
    return source, path, f"{split}.source"


# --------------------------------------------------------------------------- one stage
@dataclass
class StageResult:
    weights: Path
    steps: int


def fit_stage(
    pipeline: Pipeline,
    options: RunOptions,
    stage: Stage,
    state: RunState,
    init_weights: Path | None,
    tracking_uri: str,
    run_id: str,
) -> StageResult:
    """Train one stage under Ray Train; returns the stage's final weights in the work dir."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    config = pipeline.config
    train = config.train
    workdir = options.workdir.resolve()
    run_name = f"{config.name}-{stage.name}-{state.attempt}"
    status_dir = workdir / "ray" / run_name
    (status_dir / NONFINITE_FILE).unlink(missing_ok=True)  # a resumed stage gets a fresh verdict
    plan = stage_plan(pipeline, options.shard_root, stage)
    dataset = training_dataset(plan)
    job = StageJob(
        stage=stage.index,
        stage_name=stage.name,
        steps=stage.steps,
        model={
            "name": config.model.name,
            "preset": config.model.preset,
            "overrides": config.model.overrides,
        },
        task_names=list(config.tasks),
        train=train.model_dump(mode="json"),
        batch_size=config.data.batch_size,
        seed=config.seed + 1000 * stage.index,
        init_weights=str(init_weights) if init_weights else None,
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
        status_dir=str(status_dir.resolve()),
        step_offset=stage.offset,
        curve_run_id=state.parent_run_id,
        eval_sets=eval_sets(pipeline, options.shard_root) if train.eval_every else {},
        eval_images=config.eval.max_images,
        eval_tile=config.eval.tile,
        shuffle_rows=shuffle_buffer_rows(plan, config.data.batch_size),
        hold_final_scores=options.hold_final_scores and _is_last(pipeline, stage),
        **(options.fault or {}),
    )
    trainer = TorchTrainer(
        _train_stage_entry,
        train_loop_config=job_dict(job),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=WORKER_RESOURCES,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str((workdir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Our own lines say stage, step, loss and samples/s; Ray Train's INFO lines
            # (every checkpoint persisted, every report) would bury them.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(options.train_callbacks),
        ),
        datasets={"train": dataset},
        dataset_config=train_data_config(dataset, train.num_workers),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; the user needs the first lines of the cause
        raise CurriculumError(
            f"stage {stage.name} failed after {train.max_failures} restarts: {_cause(err)}"
        ) from err
    return _collect(result, workdir, stage, status_dir)


def _cause(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line and not line.startswith(" ")]
    return (errors[-1] if errors else lines[-1] if lines else type(err).__name__)[:500]


def _train_stage_entry(config: dict[str, Any]) -> None:
    from allinone.train import train_stage

    train_stage(config)


# One logical CPU per worker; the driver starts Ray with spare logical CPUs for Ray Data's
# readers (DESIGN.md: with none left, a 2-worker run deadlocks). Threads are set separately.
WORKER_RESOURCES = {"CPU": 1.0}


def eval_sets(pipeline: Pipeline, shards: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The test splits a worker scores every ``train.eval_every`` steps, by suite: every
    training task (all-in-one) and every unseen task (zero-shot), with the border each ignores."""
    config = pipeline.config
    suites = {"all-in-one": config.tasks, "zero-shot": config.unseen_tasks}
    return {
        suite: {
            task: {
                "folder": str(shard_folder(shards, task, "test")),
                "crop_border": pipeline.tasks[task].crop_border,
            }
            for task in tasks
        }
        for suite, tasks in suites.items()
        if tasks
    }


def stage_plan(pipeline: Pipeline, shards: Path, stage: Stage):
    """The stage's stream: its tasks' training shards, mixed by weight, for its step budget."""
    from allinone.stream import StreamPlan, task_shards

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
    )


def _collect(result, workdir: Path, stage: Stage, status_dir: Path) -> StageResult:
    metrics = result.metrics or {}
    verdict = status_dir / NONFINITE_FILE
    if verdict.is_file():
        failure = json.loads(verdict.read_text())
        kept = (
            f"; the last good checkpoint is kept: {result.checkpoint.path}"
            if result.checkpoint
            else ""
        )
        raise CurriculumError(
            f"stage {stage.name}: loss became non-finite ({failure['loss']}) at "
            f"step {failure['step']}{kept}"
        )
    if result.error:
        raise CurriculumError(f"stage {stage.name} failed: {result.error}")
    if result.checkpoint is None or not metrics.get("final"):
        raise CurriculumError(f"stage {stage.name}: training ended without its final checkpoint")
    target = workdir / "stages" / stage.name
    with result.checkpoint.as_directory() as folder:
        target.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS_FILE, STATE_FILE):
            shutil.copy2(Path(folder) / name, target / f".{name}.part")
            os.replace(target / f".{name}.part", target / name)
    return StageResult(target / WEIGHTS_FILE, int(metrics["step"]))
