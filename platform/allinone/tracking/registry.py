"""Registered models: log a trained model to MLflow and move the ``champion`` alias only on merit.

A version is logged as weights plus a model card: our checkpoint file inside an MLflow pyfunc
model whose loader is :mod:`allinone.tracking.serving`, so nothing in the registry is pickled or
code. Plain ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` restore images of any size
through that loader; our verbs read the checkpoint directly (:mod:`allinone.tracking.resolve`).
MLflow's ``pt2`` (torch.export) format was measured and not taken: exported with dynamic height
and width from a 32 x 32 example, promptir tiny restored 64 x 96 but refused 45 x 70, 77 x 123
and 321 x 481 (a guard fixes both sides to multiples of 8: the padding branch is specialised),
took 55 s to export on this 2-core CPU and cannot take a task or image bytes.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from allinone.config import Pipeline, PipelineConfig
from allinone.models.checkpoint import Checkpoint, save_checkpoint
from allinone.tracking.resolve import ResolveError, resolve_model

DEFAULT_NAME = "allinone"
CHAMPION, CHALLENGER = "champion", "challenger"
OBJECTIVE = "final/average_psnr"


@dataclass(frozen=True)
class Registration:
    """A registered model version and the alias its score earned."""

    name: str
    version: str
    alias: str  # champion or challenger
    reason: str  # why that alias: "first model", "beats champion v2 (...)", ...

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def line(self) -> str:
        return f"registered {self.name} v{self.version} as @{self.alias} ({self.reason})"


def log_and_register(
    checkpoint: Checkpoint,
    name: str,
    metrics: dict[str, float],
    suite: str,
    score: float | None,
    config: PipelineConfig | None = None,
) -> Registration:
    """Log ``checkpoint`` in the active run with its metrics, config, signature and requirements,
    register a version under ``name``, and give it the alias its ``score`` on ``suite`` earned."""
    import mlflow

    from allinone.tracking import serving

    run_id = mlflow.active_run().info.run_id if mlflow.active_run() else None
    card = dataclasses.replace(checkpoint, provenance={**checkpoint.provenance, "run_id": run_id})
    with tempfile.TemporaryDirectory() as folder:
        weights = save_checkpoint(Path(folder) / Path(serving.WEIGHTS).name, card)
        info = mlflow.pyfunc.log_model(
            name="model",
            loader_module=serving.__name__,  # imported from the installed package: no code logged
            data_path=str(weights),
            signature=serving.signature(),
            input_example=serving.input_example(),
            registered_model_name=name,
            pip_requirements=_requirements(),
            # The resolver reads the pipeline back from here: a registered model needs no run.
            metadata={
                "pipeline": config.model_dump(mode="json") if config else None,
                "model": checkpoint.spec.to_json(),
                "task_names": list(checkpoint.spec.task_names),
                "eval_suite": suite,
            },
        )
    if metrics:
        mlflow.log_metrics(metrics, model_id=info.model_id)
    version = str(info.registered_model_version)
    return assign_alias(name, version, score, suite)


def _requirements() -> list[str]:
    from importlib.metadata import version

    # What the loader imports; allinone itself must be installed where the model is served.
    packages = (
        "torch",
        "torchvision",
        "mlflow",
        "numpy",
        "scipy",
        "pillow",
        "pydantic",
        "pyyaml",
        "safetensors",
        "open_clip_torch",
        "diffusers",
    )
    return [f"{pkg}=={version(pkg)}" for pkg in packages]


def assign_alias(name: str, version: str, score: float | None, suite: str) -> Registration:
    """``champion`` when ``score`` beats the champion's on the same suite, else ``challenger``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    client.set_model_version_tag(name, version, "eval_suite", suite)
    if score is not None:
        # repr round-trips: a rounded tag would let the same score "beat" itself.
        client.set_model_version_tag(name, version, "average_psnr", repr(float(score)))
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    reason = _verdict(current, score, suite)
    alias = CHAMPION if reason.startswith("beats") or reason == "first model" else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    return Registration(name, version, alias, reason)


def _verdict(current, score: float | None, suite: str) -> str:
    if current is None:
        return "first model"
    if score is None:
        return "no score to compare"
    if current.tags.get("eval_suite") != suite:
        return f"champion was scored on another suite ({current.tags.get('eval_suite')})"
    best = float(current.tags.get("average_psnr", "-inf"))
    if score > best:
        return f"beats champion v{current.version} ({score:.3f} > {best:.3f} dB)"
    return f"does not beat champion v{current.version} ({score:.3f} <= {best:.3f} dB)"


def register_weights(
    pipeline: Pipeline,
    weights: Path,
    final: dict[str, float],
    eval_averages: dict[str, float] | None = None,
    name: str = DEFAULT_NAME,
) -> Registration:
    """Log a finished curriculum's final weights in the active run and register them, ranked on
    the pipeline's suite (:func:`ranking`) by its final and evaluation scores."""
    averages = {f"eval/{k}/average_psnr": v for k, v in (eval_averages or {}).items()}
    metrics = {**final, **averages}
    suite, score = ranking(pipeline.config, metrics)
    spec = pipeline.config.model_spec
    state = spec.load(weights).training_state_dict()
    checkpoint = Checkpoint(spec, state, {"weights": str(weights)})
    return log_and_register(checkpoint, name, metrics, suite, score, pipeline.config)


def register_run(run_id: str, tracking_uri: str | None, name: str = DEFAULT_NAME) -> Registration:
    """Register a finished curriculum run's model: its logged model when it has one, else its
    final weights, logged now into the run with the run's final metrics."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise ResolveError(f"run {run_id} not found in {mlflow.get_tracking_uri()}") from None
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        raise ResolveError(f"run {run_id} is a stage of run {parent}: register the curriculum run")
    if run.info.status != "FINISHED":
        raise ResolveError(f"run {run_id} is {run.info.status}, not FINISHED: nothing to register")
    resolved = resolve_model(run_id, tracking_uri)
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("final/", "eval/"))}
    if resolved.pipeline is None:
        suite, score = "all-in-one:" + ",".join(resolved.task_names), metrics.get(OBJECTIVE)
    else:
        suite, score = ranking(resolved.pipeline, metrics)
    if resolved.source.startswith("models:/"):  # logged earlier: register that very model
        version = mlflow.register_model(resolved.source, name).version
        return assign_alias(name, str(version), score, suite)
    with mlflow.start_run(run_id=run_id):
        return log_and_register(
            resolved.checkpoint(), name, metrics, suite, score, resolved.pipeline
        )


BENCHMARK_OBJECTIVE = "eval/all-in-one/average_psnr"


def ranking(config: PipelineConfig, metrics: dict[str, float]) -> tuple[str, float | None]:
    """The suite a run's model is ranked on, and its score there.

    The all-in-one suite on the standard test sets when the pipeline evaluated on them
    (``eval.data``), else the average over the tasks' test splits after the last stage. Two
    models compare only on the same suite: its name carries the tasks and a fingerprint of what
    decides the scores (test data, images per set, degradation seed)."""
    import hashlib
    import json

    on_benchmarks = bool(config.eval.data) and BENCHMARK_OBJECTIVE in metrics
    setup = {
        "data": config.eval.data
        if on_benchmarks
        else [config.data.test_source, config.data.test_sources],
        "max_images": config.eval.max_images,
        "seed": config.seed,
    }
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:8]
    kind = "benchmarks" if on_benchmarks else "test-splits"
    suite = f"all-in-one:{','.join(config.tasks)}:{kind}-{digest}"
    return suite, metrics.get(BENCHMARK_OBJECTIVE if on_benchmarks else OBJECTIVE)


def register_checkpoint(
    checkpoint: Checkpoint, name: str, tracking_uri: str | None = None
) -> Registration:
    """Register an imported checkpoint (an authors' release) in a run of its own, its model
    card (where it came from, the file's sha256) as the version's tags."""
    import mlflow
    from mlflow import MlflowClient

    from allinone.tracking.runs import connect

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    experiment = connect(mlflow.get_tracking_uri(), "allinone-imports")
    spec = checkpoint.spec
    with mlflow.start_run(experiment_id=experiment, run_name=f"import {spec.name}"):
        mlflow.log_params({f"imported.{k}": str(v) for k, v in checkpoint.provenance.items()})
        suite = f"imported:{spec.name}:{spec.preset}"
        registration = log_and_register(checkpoint, name, {}, suite, None)
    client = MlflowClient()
    for key, value in checkpoint.provenance.items():
        client.set_model_version_tag(name, registration.version, f"card.{key}", str(value))
    return registration
