"""``allinone tune``: a Ray Tune study over a pipeline's fields, each trial a whole curriculum.

A trial is a driver function, the form Ray's docs give for Ray Train under Tune: it applies the
trial's values to the pipeline and runs the curriculum with Ray Train's ``TuneReportCallback``, so
every evaluation a worker makes (``train.eval_every``) reaches Tune as a result. ASHA stops trials
at its rungs on those results; Optuna's TPE suggests new values from finished trials, behind a
concurrency limit so that the search stays sequential enough to learn.

Trials share the study's shards (built once) and its MLflow experiment: the study is a parent run,
each trial a child run with its stages nested below. At the end the study prints and logs a results
table and a params-vs-metric plot, and registers the best completed trial's model, which becomes
``champion`` only if it beats the current one (:mod:`allinone.tracking.registry`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from allinone.base.files import write_atomic
from allinone.cluster.ray import start_ray
from allinone.config import (
    Pipeline,
    PipelineConfig,
    SearchDomain,
    TuneSection,
)
from allinone.config.study import apply_values, max_curriculum_steps
from allinone.curriculum.plan import eval_splits, plan_stages, total_steps
from allinone.curriculum.run import open_workdir, run_pipeline
from allinone.curriculum.shards import prepare_shards
from allinone.curriculum.state import STATE, RunOptions
from allinone.data import storage
from allinone.data.storage import StoragePath
from allinone.evaluate.scoring import validation_metrics
from allinone.tracking import runs as tracking
from allinone.tracking.registry import Registration, register_weights
from allinone.train.job import CURRICULUM_STEP

DATA_CPUS_PER_TRIAL = 1.0  # logical CPUs left free for each trial's Ray Data readers
# The trial's driver only orchestrates, and scores between stages while its workers are idle:
# a token share, since Tune cannot place a trial that asks for nothing.
DRIVER_CPUS_PER_TRIAL = 0.1
TRIAL_TAG = "allinone.trial"
STUDY_STATE = "study.json"


class StudyError(RuntimeError):
    """A study that cannot start or continue; one line for users."""


def param_space(study: TuneSection) -> dict[str, Any]:
    """Ray Tune's domains. Choices travel as JSON text: Optuna's categories must be scalars,
    and a choice may be a list (e.g. prompt dims per level)."""
    from ray import tune

    def domain(d: SearchDomain):
        if d.choice is not None:
            return tune.choice([json.dumps(v) for v in d.choice])
        if d.uniform is not None:
            return tune.uniform(*d.uniform)
        if d.loguniform is not None:
            return tune.loguniform(*d.loguniform)
        low, high = d.randint
        return tune.randint(low, high + 1)  # ours includes the upper end, Ray's excludes it

    return {name: domain(d) for name, d in study.space.items()}


def decode(config: dict[str, Any], study: TuneSection) -> dict[str, Any]:
    """A trial's values as the pipeline takes them."""
    values = {}
    for name, domain in study.space.items():
        value = config[name]
        values[name] = json.loads(value) if domain.choice is not None else value
        if domain.randint is not None:
            values[name] = int(value)
    return values


# --------------------------------------------------------------------------- resources
@dataclass(frozen=True)
class Resources:
    concurrent: int  # trials at once
    threads_per_worker: int | None  # set on a local machine; a cluster's nodes decide their own


def plan_resources(config: PipelineConfig, cluster: dict[str, float], local: bool) -> Resources:
    """Trials at once from the cluster's CPUs and GPUs: each trial's workers plus room for its
    data readers (too few free CPUs for the readers deadlocks a trial). With Optuna,
    at most one trial in four runs at once, so that most are suggested from finished ones."""
    study, train = config.tune, config.train
    per_trial = DRIVER_CPUS_PER_TRIAL + train.num_workers + DATA_CPUS_PER_TRIAL
    fit = int(cluster.get("CPU", 0) // per_trial)
    if train.use_gpu:
        fit = min(fit, int(cluster.get("GPU", 0) // train.num_workers))
    if fit < 1:
        need = f"{per_trial:g} CPUs" + (f" and {train.num_workers} GPUs" if train.use_gpu else "")
        need += " (its driver, train.num_workers workers and its data readers)"
        raise StudyError(
            f"the Ray cluster ({cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs) "
            f"cannot hold one trial: it needs {need}"
        )
    cap = study.max_concurrent or (
        max(1, study.num_samples // 4) if study.search == "optuna" else fit
    )
    concurrent = min(fit, cap)
    threads = None
    if local and train.threads_per_worker is None:
        threads = max(1, (os.cpu_count() or 1) // (concurrent * train.num_workers))
    return Resources(concurrent, threads)


# --------------------------------------------------------------------------- the trial
@dataclass(frozen=True)
class StudyPlan:
    """What every trial needs, sent to the trial actors as it is: the study's pipeline loaded
    and checked once, never re-read from its file by a trial."""

    pipeline: Pipeline
    workdir: str
    shards: str  # the study's shards: a folder, or object storage (data.shards)
    tracking_uri: str
    study_run_id: str
    trial_settings: dict[str, Any]  # fields every trial gets (evaluation cadence, threads)
    # Ray Train's storage for the trials' checkpoints in object storage (train.storage), each
    # trial under its own prefix; None: each trial's own folder on disk.
    storage: str | None = None

    def trial_storage(self, trial_id: str) -> str | None:
        return None if self.storage is None else str(storage.path(self.storage) / trial_id)


def trial_pipeline(plan: StudyPlan, values: dict[str, Any]) -> Pipeline:
    """The study's pipeline with a trial's values and the settings every trial gets."""
    base = plan.pipeline
    config = apply_values(base.config, {**values, **plan.trial_settings}, base.path)
    return Pipeline(config, base.path, base.tasks)


def run_trial(config: dict[str, Any], plan: StudyPlan) -> None:
    """One trial: a whole curriculum whose workers report each evaluation to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    values = decode(config, plan.pipeline.config.tune)
    pipeline = trial_pipeline(plan, values)
    trial_id = ray.tune.get_context().get_trial_id()
    workdir = Path(plan.workdir) / "trials" / trial_id
    options = RunOptions(
        workdir,
        tracking_uri=plan.tracking_uri,
        resume=(workdir / STATE).is_file(),  # a trial restarted by a resumed study goes on
        register=False,
        shards=storage.path(plan.shards),
        storage=plan.trial_storage(trial_id),
        parent_run_id=plan.study_run_id,
        tags={TRIAL_TAG: trial_id, **{f"tune.{k}": json.dumps(v) for k, v in values.items()}},
        train_callbacks=(TuneReportCallback(),),
        hold_final_scores=True,
    )
    summary = run_pipeline(pipeline, options, say=lambda line: print(f"[trial {trial_id}] {line}"))
    ray.tune.report(final_scores(pipeline, summary.weights, storage.path(plan.shards)))


def final_scores(pipeline: Pipeline, weights: Path, shards: StoragePath) -> dict[str, float]:
    """The trial's last result: the workers' scores on the finished curriculum's weights."""
    settings = pipeline.config.eval
    scores = validation_metrics(
        pipeline.config.model_spec.load(weights),
        eval_splits(pipeline, shards),
        settings.max_images,
        settings.tile,
    )
    return {**scores, CURRICULUM_STEP: total_steps(pipeline)}


# --------------------------------------------------------------------------- the study
@dataclass
class StudyState:
    """What a study's work directory remembers for ``--resume``."""

    pipeline: str
    run_id: str | None = None

    @classmethod
    def open(cls, workdir: Path, pipeline: Pipeline, resume: bool) -> StudyState:
        path = workdir / STUDY_STATE
        if not path.is_file():
            if resume:
                raise StudyError(f"{workdir}: no study to resume here (no {STUDY_STATE})")
            return cls(pipeline.config.name)
        if not resume:
            raise StudyError(
                f"{workdir} holds a study of {pipeline.config.name}: pass --resume to continue "
                "it, or choose another --workdir"
            )
        state = cls(**json.loads(path.read_text()))
        if state.pipeline != pipeline.config.name:
            raise StudyError(f"{path}: belongs to pipeline {state.pipeline!r}")
        return state

    def save(self, workdir: Path) -> None:
        write_atomic(workdir / STUDY_STATE, json.dumps(asdict(self), indent=2))


@dataclass
class TrialRow:
    trial: str
    values: dict[str, Any]
    metric: float  # the last evaluation's value
    steps: int  # curriculum steps run
    status: str  # completed, stopped by ASHA, or error
    run_id: str | None = None
    workdir: str = ""


@dataclass
class StudyResult:
    metric: str
    mode: str
    rows: list[TrialRow] = field(default_factory=list)
    registered: Registration | None = None

    @property
    def trial_steps(self) -> int:
        return sum(row.steps for row in self.rows)

    def best(self) -> TrialRow | None:
        done = [r for r in self.rows if r.status == "completed" and math.isfinite(r.metric)]
        sign = 1 if self.mode == "max" else -1
        return max(done, key=lambda r: sign * r.metric, default=None)


@dataclass(frozen=True)
class StudyOptions:
    workdir: Path
    tracking_uri: str | None = None
    address: str | None = None
    resume: bool = False
    storage: str | None = None  # the trials' checkpoints (--storage), else train.storage


def run_study(pipeline: Pipeline, options: StudyOptions, say=print) -> StudyResult:
    """Run (or resume) the pipeline's study; returns the trials and the registration."""
    import mlflow
    import ray

    study = pipeline.config.tune
    if study is None:
        raise StudyError(f"{pipeline.path}: no tune: block, so nothing to search")
    space = open_workdir(pipeline, options.workdir, options.tracking_uri, options.address)
    workdir, uri, experiment = space.folder, space.tracking_uri, space.experiment_id
    state = StudyState.open(workdir, pipeline, options.resume)
    start_ray(options.address)
    # data.shards and train.storage as a run takes them (each store checked before any write).
    stores = RunOptions(workdir, storage=options.storage).for_pipeline(pipeline)
    shards = stores.shard_root
    prepare_shards(pipeline, shards, on_build=say)
    resources = plan_resources(
        pipeline.config, ray.cluster_resources(), local=options.address is None
    )
    with tracking.run(state.run_id, experiment, f"{pipeline.config.name}-study") as run_id:
        if state.run_id is None:
            state.run_id = run_id
            state.save(workdir)
            mlflow.log_params({"tune.config": json.dumps(study.model_dump(mode="json"))[:6000]})
        plan = StudyPlan(
            pipeline,
            str(workdir),
            str(shards),
            uri,
            run_id,
            _trial_settings(study, resources),
            storage=str(stores.checkpoint_root) if stores.storage else None,
        )
        say(
            f"study: {study.num_samples} trials, {resources.concurrent} at a time, "
            f"{study.search} search, {study.scheduler} scheduler, objective {study.metric} "
            f"({study.mode})"
        )
        grid = _tuner(pipeline, plan, resources, workdir, options.resume).fit()
        result = _collect(grid, pipeline, workdir)
        _close_stopped_runs(result, uri)
        _log_study(result)
        best = result.best()
        if best and study.register_best:
            result.registered = _register(best, plan, say)
    return result


def _trial_settings(study: TuneSection, resources: Resources) -> dict[str, Any]:
    # Every report carries an evaluation: Tune requires the objective in every result.
    settings: dict[str, Any] = {
        "train.eval_every": study.eval_every,
        "train.checkpoint_every": study.eval_every,
    }
    if resources.threads_per_worker:
        settings["train.threads_per_worker"] = resources.threads_per_worker
    return settings


def _tuner(pipeline: Pipeline, plan: StudyPlan, resources: Resources, workdir: Path, resume: bool):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan), {"cpu": DRIVER_CPUS_PER_TRIAL}
    )
    state_folder = workdir / "tune"  # Tune's own experiment state stays on the driver's disk
    if resume:
        if not tune.Tuner.can_restore(str(state_folder / "study")):
            raise StudyError(f"{state_folder / 'study'}: no Ray Tune state to resume from")
        return tune.Tuner.restore(
            str(state_folder / "study"), trainable=trainable, resume_errored=True
        )
    study = pipeline.config.tune
    return tune.Tuner(
        trainable,
        param_space=param_space(study),
        tune_config=tune.TuneConfig(
            metric=study.metric,
            mode=study.mode,
            num_samples=study.num_samples,
            # Tune applies this to Searchers only; random search limits itself (see _search).
            max_concurrent_trials=resources.concurrent if study.search != "random" else None,
            search_alg=_search(study, pipeline.config.seed, resources.concurrent),
            scheduler=_scheduler(study, pipeline.config),
        ),
        run_config=tune.RunConfig(
            name="study",
            storage_path=str(state_folder),
            verbose=0,  # our own lines and table; Tune's would repeat them every few seconds
        ),
    )


def _search(study: TuneSection, seed: int, concurrent: int):
    if study.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # A SearchGenerator: TuneConfig's max_concurrent_trials would be ignored, and every
        # trial would start at once and starve the others' worker groups of CPUs.
        return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=TPESampler(seed=seed))


def _scheduler(study: TuneSection, config: PipelineConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if study.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=CURRICULUM_STEP,
        max_t=max_curriculum_steps(config),
        grace_period=study.asha.grace_steps or study.eval_every,
        reduction_factor=study.asha.reduction_factor,
    )


# --------------------------------------------------------------------------- results
def _collect(grid, pipeline: Pipeline, workdir: Path) -> StudyResult:
    study = pipeline.config.tune
    result = StudyResult(study.metric, study.mode)
    for trial in grid:
        metrics = trial.metrics or {}
        trial_id = metrics.get("trial_id") or _trial_id_of(Path(trial.path).name)
        values = decode(trial.config, study)
        steps = int(metrics.get(CURRICULUM_STEP, 0))
        budget = _curriculum_steps(pipeline, values)
        status = "error" if trial.error else "completed" if steps >= budget else "stopped by ASHA"
        folder = workdir / "trials" / trial_id
        metric = float(metrics.get(study.metric, math.nan))
        result.rows.append(
            TrialRow(trial_id, values, metric, steps, status, _trial_run_id(folder), str(folder))
        )
    result.rows.sort(key=lambda row: row.trial)
    return result


def _trial_id_of(folder_name: str) -> str:
    """A trial that never reported: its id from Tune's folder name, ``run_trial_<id>_...``."""
    found = re.match(rf"{run_trial.__name__}_([0-9a-f]+)_", folder_name)
    return found.group(1) if found else folder_name


def _curriculum_steps(pipeline: Pipeline, values: dict[str, Any]) -> int:
    config = apply_values(pipeline.config, values, pipeline.path)
    return sum(s.steps for s in plan_stages(Pipeline(config, pipeline.path, pipeline.tasks)))


def _trial_run_id(workdir: Path) -> str | None:
    state = workdir / STATE
    return json.loads(state.read_text()).get("parent_run_id") if state.is_file() else None


def _close_stopped_runs(result: StudyResult, uri: str) -> None:
    """A trial that ASHA stopped or that failed had no chance to end its MLflow runs: mark them
    KILLED or FAILED, never leave them RUNNING or let them look finished."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for row in result.rows:
        if row.status == "completed" or row.run_id is None:
            continue
        status = "FAILED" if row.status == "error" else "KILLED"
        run = client.get_run(row.run_id)
        children = client.search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{row.run_id}'"
        )
        # A stop can land mid-stage (the run ends FAILED as its driver is interrupted) or
        # between two (nothing ends it): either way the trial was stopped, not broken.
        for each in [run, *children]:
            if each.info.status in ("RUNNING", "FAILED"):
                client.set_terminated(each.info.run_id, status)
        client.set_tag(row.run_id, "allinone.trial_status", row.status)


def table_rows(result: StudyResult) -> list[list[str]]:
    """trial, each searched field, the metric, steps run, status; best first."""
    sign = -1 if result.mode == "max" else 1
    order = sorted(
        result.rows,
        key=lambda r: (r.status != "completed", sign * r.metric if math.isfinite(r.metric) else 0),
    )
    names = list(result.rows[0].values) if result.rows else []
    header = ["trial", *names, result.metric, "steps", "status"]
    body = [
        [
            row.trial,
            *(_shown(row.values.get(n)) for n in names),
            f"{row.metric:.3f}",
            str(row.steps),
            row.status,
        ]
        for row in order
    ]
    return [header, *body]


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def to_markdown(rows: list[list[str]]) -> str:
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def plot_params(result: StudyResult, path: Path) -> Path:
    """One scatter per searched field: its value against the metric; hollow = stopped early."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.rows[0].values)
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        values = [row.values[name] for row in result.rows]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        labels = sorted({json.dumps(v) for v in values})
        xs = values if numeric else [labels.index(json.dumps(v)) for v in values]
        for x, row in zip(xs, result.rows, strict=True):
            done = row.status == "completed"
            axis.scatter(x, row.metric, s=40, c="C0" if done else "none", edgecolors="C0")
        if not numeric:
            axis.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        elif any(v > 0 for v in values) and max(values) / max(min(values), 1e-30) > 20:
            axis.set_xscale("log")
        axis.set_xlabel(name)
        axis.set_ylabel(result.metric)
    figure.suptitle("trials: filled = completed, hollow = stopped early")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _log_study(result: StudyResult) -> None:
    """The study's run: the table (markdown, JSON), the plot, and the study's totals."""
    import tempfile

    import mlflow

    best = result.best()
    mlflow.log_metrics(
        {
            "study/trials": len(result.rows),
            "study/completed": sum(r.status == "completed" for r in result.rows),
            "study/trial_steps": result.trial_steps,
            **({f"study/best/{result.metric}": best.metric} if best else {}),
        }
    )
    if best:
        mlflow.set_tag("allinone.best_trial", best.trial)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "trials.md").write_text(to_markdown(table_rows(result)))
        (Path(folder) / "trials.json").write_text(
            json.dumps([asdict(r) for r in result.rows], indent=2, default=str)
        )
        if result.rows:
            plot_params(result, Path(folder) / "params_vs_metric.png")
        mlflow.log_artifacts(folder, "tune")


def _register(best: TrialRow, plan: StudyPlan, say) -> Registration:
    """The best completed trial's final weights, logged in its own run and registered."""
    import mlflow
    from mlflow import MlflowClient

    state = json.loads((Path(best.workdir) / STATE).read_text())
    last = list(state["finished"])[-1]
    weights = Path(state["finished"][last]["weights"])
    metrics = MlflowClient().get_run(best.run_id).data.metrics
    final = {k: v for k, v in metrics.items() if k.startswith("final/")}
    with mlflow.start_run(run_id=best.run_id, nested=True):
        registration = register_weights(trial_pipeline(plan, best.values), weights, final)
    say(registration.line())
    return registration
