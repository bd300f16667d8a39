"""Fitting one stage: a Ray Train TorchTrainer of DeepSpeed workers fed by the stage's stream.

A stage's Ray Train run keeps its checkpoints in the run's storage (``--storage`` or
``train.storage``: a folder, or object storage that every node reaches; default the work
directory), so a restarted worker (or a resumed driver) continues from the last one; the stage's
final weights are copied out to ``stages/<stage>/model.pt``, which the next stage starts from.
With object storage the workers read those starting weights from there, not from this machine.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from allinone.base.errors import first_line
from allinone.config import Pipeline
from allinone.curriculum.plan import Stage, eval_splits, is_last, stage_plan
from allinone.curriculum.state import CurriculumError, RunOptions, RunState
from allinone.data import storage
from allinone.data.storage import StoragePath
from allinone.data.stream import shuffle_buffer_rows, train_data_config, training_dataset
from allinone.train.job import NONFINITE_FILE, STARTUP_METRIC, STATE_FILE, WEIGHTS_FILE, StageJob
from allinone.train.loop import train_stage


@dataclass
class StageResult:
    weights: Path
    steps: int
    startup_s: float | None = None  # trainer.fit() called to the first step done


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
    from ray.train.torch import TorchTrainer

    from allinone.cluster.process_group import LoopbackTorchConfig

    config = pipeline.config
    train = config.train
    workdir = options.workdir.resolve()
    run_name = f"{config.name}-{stage.name}-{state.attempt}"
    # Beside the stage's checkpoints, which every node reaches (a worker on another node cannot
    # write to this machine's disk).
    status_dir = options.checkpoint_root / run_name
    (status_dir / NONFINITE_FILE).unlink(missing_ok=True)  # a resumed stage gets a fresh verdict
    plan = stage_plan(pipeline, options.shard_root, stage)
    dataset = training_dataset(plan)
    job = StageJob(
        stage=stage.index,
        stage_name=stage.name,
        steps=stage.steps,
        model=stage.model_spec(pipeline),
        train=train,
        batch_size=config.data.batch_size,
        seed=config.seed + 1000 * stage.index,
        init_weights=_start_weights(init_weights, options.checkpoint_root, run_name),
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
        status_dir=str(status_dir),
        step_offset=stage.offset,
        curve_run_id=state.parent_run_id,
        eval_splits=eval_splits(pipeline, options.shard_root) if train.eval_every else (),
        eval_images=config.eval.max_images,
        eval_tile=config.eval.tile,
        shuffle_rows=shuffle_buffer_rows(plan, config.data.batch_size),
        hold_final_scores=options.hold_final_scores and is_last(pipeline, stage),
        fault=options.fault,
        fit_called_at=time.time(),  # the trainer is built and fit() called right after this
    )
    trainer = TorchTrainer(
        # The job travels with the function, which only the workers unpickle; as
        # train_loop_config it would reach Ray Train's controller too, which would import torch
        # (1.3 s of the stage's start-up) to unpickle a value it never reads.
        functools.partial(_train_from_storage, {"job": job}),
        # On the local cluster the process group's store listens on 127.0.0.1 only.
        torch_config=LoopbackTorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=WORKER_RESOURCES,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(options.checkpoint_root),
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


def _start_weights(weights: Path | None, root: StoragePath, run_name: str) -> str | None:
    """Where the workers read the stage's starting weights: beside the checkpoints when those are
    in object storage (a worker on another node cannot read this machine's disk), else the file."""
    if weights is None or not storage.is_remote(root):
        return str(weights) if weights else None
    target = root / "start" / run_name / WEIGHTS_FILE
    target.upload(weights)
    return str(target)


def _train_from_storage(config: dict) -> None:
    """Ray Train's worker function: ``train_stage``, with starting weights in object storage first
    copied to the worker's own disk."""
    job: StageJob = config["job"]
    if not storage.is_remote(job.init_weights):
        return train_stage(config)
    with tempfile.TemporaryDirectory(prefix="allinone-start-") as folder:
        local = Path(folder) / WEIGHTS_FILE
        storage.path(job.init_weights).download(local)
        return train_stage({**config, "job": replace(job, init_weights=str(local))})


def _cause(err: BaseException) -> str:
    """The line of a Ray-wrapped worker error that names the real exception (the last
    ``...Error`` line of the traceback Ray includes), else its first line."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line and not line.startswith(" ")]
    return errors[-1][:500] if errors else first_line(err, 500)


def _nonfinite_message(stage: Stage, failure: dict, result) -> str:
    # Workers check the loss before each update and the weights before each save, so every
    # checkpoint Ray Train holds is finite: the last one is the last finite one.
    what = failure.get("what", "loss")
    kept = (
        f"the last finite checkpoint is kept: {result.checkpoint.path}"
        if result.checkpoint
        else "no finite checkpoint was saved"
    )
    return (
        f"stage {stage.name}: the {what} became non-finite at step {failure['step']} "
        f"(loss {failure['loss']}); {kept}"
    )


def _drop_unregistered_checkpoints(result) -> None:
    """Remove the stage's checkpoint folders that Ray Train never registered: a worker killed
    after writing one and before the controller collected its report leaves it behind, and
    nothing would ever read or prune it."""
    from pyarrow import fs

    kept = {Path(checkpoint.path).name for checkpoint, _ in result.best_checkpoints or []}
    if result.checkpoint is not None:
        kept.add(Path(result.checkpoint.path).name)
    for info in result.filesystem.get_file_info(fs.FileSelector(result.path, allow_not_found=True)):
        folder = info.type == fs.FileType.Directory and info.base_name.startswith("checkpoint_")
        if folder and info.base_name not in kept:
            result.filesystem.delete_dir(info.path)


# One logical CPU per worker; the driver starts Ray with spare logical CPUs for Ray Data's
# readers (with none left, a 2-worker run deadlocks). Threads are set separately.
WORKER_RESOURCES = {"CPU": 1.0}


def _collect(result, workdir: Path, stage: Stage, status_dir: StoragePath) -> StageResult:
    metrics = result.metrics or {}
    _drop_unregistered_checkpoints(result)
    verdict = status_dir / NONFINITE_FILE
    if verdict.is_file():
        raise CurriculumError(_nonfinite_message(stage, json.loads(verdict.read_text()), result))
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
    return StageResult(target / WEIGHTS_FILE, int(metrics["step"]), metrics.get(STARTUP_METRIC))
