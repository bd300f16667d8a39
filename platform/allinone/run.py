"""``allinone run``: shards, then every curriculum stage, evaluated and tracked, then registration.

The driver owns no training: it prepares data, starts each stage's TorchTrainer, scores the
stage's weights on every task's test split, logs to MLflow and records progress in the work
directory so that ``--resume`` continues where a killed driver stopped.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from allinone import tracking
from allinone.config import Pipeline
from allinone.curriculum import (
    RunOptions,
    RunState,
    Stage,
    fit_stage,
    plan_stages,
    prepare_shards,
    shard_folder,
    shard_sources,
)
from allinone.resolve import write_model_card
from allinone.suites import check_eval_data

# Trainer and data readers share the cores: idle OpenMP threads must sleep, not spin (spinning
# threads slowed the tiny models 5-20x when another process was busy, measured on 2 cores).
# Ray Train's print patch would echo every progress line twice on the driver.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


class ClusterError(RuntimeError):
    """A Ray address that does not answer."""


def start_ray(address: str | None) -> None:
    """Join the given cluster, the job's cluster (RAY_ADDRESS), or start a local one."""
    import ray

    if ray.is_initialized():  # a study's trial, or a caller that started Ray itself
        quiet_ray_data()
        return
    for name, value in WORKER_ENV.items():  # Ray Train hands these on to its controller and workers
        os.environ.setdefault(name, value)
    check_ray_address(address)
    try:
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address, log_to_driver=True)
        else:
            # Spare logical CPUs for Ray Data's readers: on 2 cores a 2-worker trainer would
            # otherwise take every CPU and the stream would starve (DESIGN.md).
            cores = os.cpu_count() or 2
            ray.init(
                address="local",
                num_cpus=max(4, 2 * cores),
                # The dashboard serves Ray's State API: without it Ray Train's placement-group
                # cleaner warns every second that it cannot see its controller.
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                runtime_env={"env_vars": WORKER_ENV},
            )
    except (ConnectionError, TimeoutError, RuntimeError) as err:
        raise ClusterError(
            f"Ray cluster at {address or os.environ.get('RAY_ADDRESS')} "
            f"does not answer: {str(err).splitlines()[0]}"
        ) from None
    quiet_ray_data()


def check_ray_address(address: str | None) -> None:
    """The cluster a run will join (``--address``, else $RAY_ADDRESS) answers, if there is one."""
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target != "auto":
        check_reachable(target)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when nothing listens at a Ray address (``ray.init`` would wait minutes)."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ClusterError(
            f"Ray cluster at {address} does not answer ({err.strerror or err})"
        ) from None


def quiet_ray_data() -> None:
    """Our own progress lines say stage, step, loss and samples/s; Ray Data's bars would bury them.
    The context travels with each dataset to the processes that execute it."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def open_workdir(
    pipeline: Pipeline,
    workdir: Path,
    tracking_uri: str | None,
    address: str | None,
    builds_shards: bool = True,
) -> tuple[Path, str, str]:
    """What can be checked before anything is written, then the work directory and its tracking
    store: ``(workdir, tracking URI, experiment id)``."""
    if builds_shards:
        shard_sources(pipeline)  # every data folder exists, or the error names its field
    check_eval_data(pipeline)
    check_pretrained(pipeline)
    check_ray_address(address)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or tracking.default_tracking_uri(workdir)
    return workdir, uri, tracking.connect(uri, pipeline.config.name)


def run_pipeline(pipeline: Pipeline, options: RunOptions, say=print) -> dict[str, Any]:
    """Run a whole curriculum; returns the task x stage PSNR matrix and the final scores."""
    import mlflow

    workdir, uri, experiment = open_workdir(
        pipeline,
        options.workdir,
        options.tracking_uri,
        options.address,
        builds_shards=options.shards is None,
    )
    state = RunState.open(workdir, pipeline, options.resume)
    start_ray(options.address)
    if options.shards is None:
        prepare_shards(pipeline, options.shard_root, on_build=say)

    matrix: dict[str, dict[str, float]] = {}
    with tracking.run(
        state.parent_run_id, experiment, pipeline.config.name, parent_id=options.parent_run_id
    ) as parent_id:
        if state.parent_run_id is None:
            state.parent_run_id = parent_id
            state.save(workdir)
            _log_config(pipeline)
            mlflow.set_tags(options.tags)
        weights = pipeline.pretrained  # the first stage's start: our own checkpoint, or none
        for stage in plan_stages(pipeline):
            if stage.name in state.finished:
                say(f"{stage.name}: finished earlier, skipped")
                weights = Path(state.finished[stage.name]["weights"])
                matrix[stage.name] = state.finished[stage.name]["psnr"]
                continue
            weights, scores = _run_stage(
                pipeline, options, stage, state, weights, uri, experiment, say
            )
            matrix[stage.name] = scores
        summary = _summarise(pipeline, matrix) | {"run_id": parent_id, "weights": str(weights)}
        mlflow.log_metrics(summary["final"])
        summary["continual"] = _log_continual(pipeline, matrix)
        tracking.log_json(summary, "results/summary.json")
        summary["eval"] = _evaluate_run_end(pipeline, options.shard_root, weights, say)
        if options.register:
            from allinone.registry import register_weights

            summary["registered"] = register_weights(pipeline, weights, summary, say)
    return summary


def check_pretrained(pipeline: Pipeline) -> None:
    """Before any training: ``model.pretrained`` must fit the configured architecture."""
    from allinone.config import ConfigError
    from allinone.models.weights import load_state_file
    from allinone.registry import build_from_pipeline

    if pipeline.pretrained is None:
        return
    try:
        load_state_file(build_from_pipeline(pipeline), pipeline.pretrained, "model.pretrained")
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(pipeline.path, "model.pretrained", str(err)) from None


def _run_stage(
    pipeline: Pipeline,
    options: RunOptions,
    stage: Stage,
    state: RunState,
    weights: Path | None,
    uri: str,
    experiment: str,
    say,
):
    import mlflow

    workdir = options.workdir.resolve()
    say(f"{stage.name}: training {', '.join(stage.tasks)} for {stage.steps} steps")
    with tracking.run(
        state.stage_runs.get(stage.name), experiment, stage.name, nested=True
    ) as run_id:
        if stage.name not in state.stage_runs:
            state.stage_runs[stage.name] = run_id
            state.save(workdir)
            mlflow.log_params(
                {
                    "stage.index": stage.index,
                    "stage.tasks": ",".join(stage.tasks),
                    "stage.steps": stage.steps,
                }
            )
        result = fit_stage(pipeline, options, stage, state, weights, uri, run_id)
        write_model_card(result.weights, pipeline.config, stage.name)  # a bare model.pt loads
        scores = _score_stage(
            pipeline, options.shard_root, result.weights, [run_id, state.parent_run_id]
        )
        mlflow.log_metrics(
            {k: v for s in scores.values() for k, v in s.as_metrics(f"test/{s.task}").items()}
        )
        mlflow.log_param("checkpoint", str(result.weights))
        psnr = {task: score.psnr for task, score in scores.items()}
        say(f"{stage.name}: " + ", ".join(f"{t} {p:.2f} dB" for t, p in psnr.items()))
    state.finished[stage.name] = {"weights": str(result.weights), "psnr": psnr, "run_id": run_id}
    state.save(workdir)
    return result.weights, psnr


def _score_stage(pipeline: Pipeline, shards: Path, weights: Path, grid_runs: list[str]):
    """Every trained task's test split; each task's grid goes to the stage run and the parent
    run (where the last stage's grids stay, for the run's report)."""
    from allinone.evaluate import score_task_with_sample
    from allinone.grids import log_grid
    from allinone.registry import load_weights

    model = load_weights(pipeline, weights)
    settings = pipeline.config.eval
    scores = {}
    for task in pipeline.config.tasks:
        folder = shard_folder(shards, task, "test")
        scores[task], sample = score_task_with_sample(
            model,
            folder,
            task,
            settings.max_images,
            settings.tile,
            pipeline.tasks[task].crop_border,
        )
        for run_id in grid_runs if settings.grids else []:
            log_grid(sample, task, f"{task}: test split", run_id=run_id)
    return scores


def _log_continual(pipeline: Pipeline, matrix: dict[str, dict[str, float]]) -> dict[str, float]:
    from allinone.continual import log_continual

    stages = [stage.tasks for stage in plan_stages(pipeline)]
    return log_continual(matrix, stages, pipeline.config.tasks)


def _evaluate_run_end(pipeline: Pipeline, shards: Path, weights: Path | None, say):
    """The pipeline's ``eval.suites`` on the final weights; their average PSNRs, if any ran."""
    from allinone.suites import evaluate_run_end

    results = evaluate_run_end(pipeline, shards, weights, say)
    return results.averages() if results else {}


def _log_config(pipeline: Pipeline) -> None:
    import mlflow

    config = pipeline.config.model_dump(mode="json")
    mlflow.log_params(tracking.flat_params(config))
    tracking.log_json(config, "config/pipeline.json")
    tracking.log_json(
        {n: t.model_dump(mode="json") for n, t in pipeline.tasks.items()}, "config/tasks.json"
    )


def _summarise(pipeline: Pipeline, matrix: dict[str, dict[str, float]]) -> dict[str, Any]:
    last = matrix[list(matrix)[-1]]
    final = {f"final/{task}/psnr": value for task, value in last.items()}
    final["final/average_psnr"] = sum(last.values()) / len(last)
    return {"matrix": matrix, "final": final, "tasks": list(pipeline.config.tasks)}
