"""``allinone run``: shards, then every curriculum stage, evaluated and tracked, then registration.

The driver owns no training: it prepares data, starts each stage's TorchTrainer, scores the
stage's weights on every task's test split, logs to MLflow and records progress in the work
directory so that ``--resume`` continues where a killed driver stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from allinone.cluster.ray import check_ray_address, start_ray
from allinone.config import ConfigError, Pipeline
from allinone.curriculum.fit import fit_stage
from allinone.curriculum.plan import Stage, plan_stages
from allinone.curriculum.scoring import check_eval_data, evaluate_run_end, score_stage
from allinone.curriculum.shards import prepare_shards, shard_sources
from allinone.curriculum.state import RunOptions, RunState, hold_workdir, release_workdir
from allinone.evaluate.continual import log_continual
from allinone.evaluate.suites import Results
from allinone.tracking import runs as tracking
from allinone.tracking.registry import Registration, register_weights
from allinone.tracking.resolve import write_model_card


@dataclass(frozen=True)
class RunTiming:
    """Where this attempt's time went: all of it, and each stage's start-up (``trainer.fit()``
    called to its first step: Ray Train's processes, imports, the engine, the first batch)."""

    wall_s: float
    startups: dict[str, float]  # stage -> seconds, for the stages trained in this attempt


@dataclass(frozen=True)
class Workspace:
    """A run's work directory and the tracking store its runs go to."""

    folder: Path
    tracking_uri: str
    experiment_id: str


@dataclass(frozen=True)
class RunSummary:
    """What a finished curriculum produced, for its caller (the CLI, a study's trial)."""

    run_id: str
    workspace: Workspace
    tasks: tuple[str, ...]
    weights: Path | None  # the last stage's model.pt
    matrix: dict[str, dict[str, float]]  # stage -> task -> test-split PSNR after that stage
    final: dict[str, float]  # final/<task>/psnr and final/average_psnr
    continual: dict[str, float] = field(default_factory=dict)  # forgetting, backward transfer
    eval: dict[str, float] = field(default_factory=dict)  # suite -> average PSNR on real sets
    registered: Registration | None = None
    results: Results | None = None  # the run-end suites' rows (real test sets, baselines)
    timing: RunTiming | None = None  # None for a run that had finished earlier

    @property
    def average_psnr(self) -> float:
        return self.final["final/average_psnr"]


def open_workdir(
    pipeline: Pipeline,
    workdir: Path,
    tracking_uri: str | None,
    address: str | None,
    builds_shards: bool = True,
) -> Workspace:
    """What can be checked before anything is written, then the work directory and its tracking
    store."""
    check_inputs(pipeline, builds_shards)
    check_ray_address(address)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    hold_workdir(workdir)  # before the tracking store: two starts must not both migrate it
    uri = tracking_uri or tracking.default_tracking_uri(workdir)
    return Workspace(workdir, uri, tracking.connect(uri, pipeline.config.name))


def check_inputs(pipeline: Pipeline, builds_shards: bool = True) -> None:
    """Everything a run reads before it writes anything, where it runs: the data folders, the
    test sets and the pretrained weights; the error names the field (``allinone submit`` runs
    this on the cluster before it queues the job)."""
    if builds_shards:
        shard_sources(pipeline)  # every data folder exists, or the error names its field
    check_eval_data(pipeline)
    check_pretrained(pipeline)


def check_pretrained(pipeline: Pipeline) -> None:
    """Before any training: ``model.pretrained`` must fit the configured architecture."""
    if pipeline.pretrained is None:
        return
    try:
        pipeline.config.model_spec.load(pipeline.pretrained)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(pipeline.path, "model.pretrained", str(err)) from None


def run_pipeline(pipeline: Pipeline, options: RunOptions, say=print) -> RunSummary:
    """Run (or resume) a whole curriculum: every stage trained, scored and tracked. The work
    directory is this process's until the run ends (:func:`hold_workdir`)."""
    options = options.for_pipeline(pipeline)  # where its shards and checkpoints live
    try:
        space = open_workdir(
            pipeline,
            options.workdir,
            options.tracking_uri,
            options.address,
            builds_shards=options.shards is None,
        )
        state = RunState.open(space.folder, pipeline, options.resume)
        if state.completed is not None:
            return _finished_earlier(pipeline, state, space, say)
        return _run(pipeline, options, state, space, say)
    finally:
        release_workdir(options.workdir)


def _finished_earlier(pipeline: Pipeline, state: RunState, space: Workspace, say) -> RunSummary:
    """A --resume of a run that ended: what it made, and nothing done again."""
    done = state.completed or {}
    registered = f", registered as {done['registered']}" if done.get("registered") else ""
    say(
        f"{space.folder}: this run of {pipeline.config.name} finished earlier (MLflow run "
        f"{state.parent_run_id}); its model: {done.get('weights')}{registered}. Nothing to resume."
    )
    matrix = {name: stage["psnr"] for name, stage in state.finished.items()}
    weights = Path(done["weights"]) if done.get("weights") else None
    return RunSummary(
        state.parent_run_id or "",
        space,
        tuple(pipeline.config.tasks),
        weights,
        matrix,
        _final_scores(matrix),
    )


def _run(
    pipeline: Pipeline, options: RunOptions, state: RunState, space: Workspace, say
) -> RunSummary:
    began = time.monotonic()
    start_ray(options.address)
    if options.shards is None:
        prepare_shards(pipeline, options.shard_root, on_build=say)
    with tracking.run(
        state.parent_run_id,
        space.experiment_id,
        pipeline.config.name,
        parent_id=options.parent_run_id,
    ) as parent_id:
        if state.parent_run_id is None:
            state.parent_run_id = parent_id
            state.save(space.folder)
            _log_config(pipeline)
            mlflow.set_tags(options.tags)
        weights, matrix, startups = _run_stages(pipeline, options, state, space, say)
        final = _final_scores(matrix)
        mlflow.log_metrics(final)
        # A component's own stage (a classifier, a refinement decoder) learns no task.
        stages = [() if stage.trains else stage.tasks for stage in plan_stages(pipeline)]
        continual = log_continual(matrix, stages, pipeline.config.tasks)
        tracking.log_json(
            {"matrix": matrix, "final": final, "continual": continual, "weights": str(weights)},
            "results/summary.json",
        )
        results = evaluate_run_end(pipeline, options.shard_root, weights, say)
        averages = results.averages() if results else {}
        registered = None
        if options.register and weights is not None:
            registered = register_weights(pipeline, weights, final, averages)
            say(registered.line())
        state.completed = {
            "weights": str(weights) if weights else None,
            "registered": f"{registered.name} v{registered.version}" if registered else None,
        }
        state.save(space.folder)
    return RunSummary(
        parent_id,
        space,
        tuple(pipeline.config.tasks),
        weights,
        matrix,
        final,
        continual,
        averages,
        registered,
        results,
        RunTiming(time.monotonic() - began, startups),
    )


def _run_stages(pipeline, options, state, space, say):
    """Every stage in order, skipping those a resumed run finished earlier: the last weights,
    the task x stage PSNR matrix and the start-up of each stage trained here."""
    matrix: dict[str, dict[str, float]] = {}
    startups: dict[str, float] = {}
    weights = pipeline.pretrained  # the first stage's start: our own checkpoint, or none
    for stage in plan_stages(pipeline):
        if stage.name in state.finished:
            say(f"{stage.name}: finished earlier, skipped")
            weights = Path(state.finished[stage.name]["weights"])
            matrix[stage.name] = state.finished[stage.name]["psnr"]
            continue
        weights, matrix[stage.name], startup = _run_stage(
            pipeline, options, stage, state, weights, space, say
        )
        if startup is not None:
            startups[stage.name] = startup
    return weights, matrix, startups


def _run_stage(
    pipeline: Pipeline,
    options: RunOptions,
    stage: Stage,
    state: RunState,
    weights: Path | None,
    space: Workspace,
    say,
) -> tuple[Path, dict[str, float], float | None]:
    say(f"{stage.name}: training {', '.join(stage.tasks)} for {stage.steps} steps")
    with tracking.run(
        state.stage_runs.get(stage.name), space.experiment_id, stage.name, nested=True
    ) as run_id:
        if stage.name not in state.stage_runs:
            state.stage_runs[stage.name] = run_id
            state.save(space.folder)
            mlflow.log_params(
                {
                    "stage.index": stage.index,
                    "stage.tasks": ",".join(stage.tasks),
                    "stage.steps": stage.steps,
                }
            )
        result = fit_stage(pipeline, options, stage, state, weights, space.tracking_uri, run_id)
        write_model_card(result.weights, pipeline.config, stage.name)  # a bare model.pt loads
        scores = score_stage(
            pipeline, options.shard_root, result.weights, [run_id, state.parent_run_id]
        )
        mlflow.log_metrics(
            {k: v for s in scores.values() for k, v in s.as_metrics(f"test/{s.task}").items()}
        )
        mlflow.log_param("checkpoint", str(result.weights))
        psnr = {task: score.psnr for task, score in scores.items()}
        say(f"{stage.name}: " + ", ".join(f"{t} {p:.2f} dB" for t, p in psnr.items()))
    state.finished[stage.name] = {"weights": str(result.weights), "psnr": psnr, "run_id": run_id}
    state.save(space.folder)
    return result.weights, psnr, result.startup_s


def _log_config(pipeline: Pipeline) -> None:
    config = pipeline.config.model_dump(mode="json")
    mlflow.log_params(tracking.flat_params(config))
    tracking.log_json(config, "config/pipeline.json")
    tracking.log_json(
        {n: t.model_dump(mode="json") for n, t in pipeline.tasks.items()}, "config/tasks.json"
    )


def _final_scores(matrix: dict[str, dict[str, float]]) -> dict[str, float]:
    last = matrix[list(matrix)[-1]]
    final = {f"final/{task}/psnr": value for task, value in last.items()}
    final["final/average_psnr"] = sum(last.values()) / len(last)
    return final
