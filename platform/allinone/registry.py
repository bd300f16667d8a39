"""Registered models: log a trained model to MLflow and move the ``champion`` alias only on merit.

Models are logged pickled (not through ``torch.export``, MLflow 3's default, which fixes the input
size) with this package shipped as code, so plain ``mlflow.pytorch.load_model`` returns a module
that restores an image of any size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from allinone.config import Pipeline

DEFAULT_NAME = "allinone"
CHAMPION, CHALLENGER = "champion", "challenger"
OBJECTIVE = "final/average_psnr"


def build_from_pipeline(pipeline: Pipeline):
    from allinone.models import build

    spec = pipeline.config.model
    return build(spec.name, spec.preset, task_names=tuple(pipeline.config.tasks), **spec.overrides)


def load_weights(pipeline: Pipeline, weights: Path) -> torch.nn.Module:
    model = build_from_pipeline(pipeline)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def _signature():
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # Any batch, any height and width: -1 marks every free dimension.
    spec = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))])
    return ModelSignature(inputs=spec, outputs=spec)


def log_and_register(
    model: torch.nn.Module, name: str, metrics: dict[str, float], suite: str
) -> dict[str, Any]:
    """Log ``model`` in the active run, register a version, and give it the alias it earned."""
    import mlflow

    package = Path(__file__).resolve().parent
    info = mlflow.pytorch.log_model(
        model.eval(),
        name="model",
        serialization_format="pickle",
        code_paths=[str(package)],
        signature=_signature(),
        registered_model_name=name,
        pip_requirements=_requirements(),
    )
    version = str(info.registered_model_version)
    return assign_alias(name, version, metrics.get(OBJECTIVE), suite)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{pkg}=={version(pkg)}"
        for pkg in ("torch", "torchvision", "mlflow", "numpy", "open_clip_torch", "diffusers")
    ]


def assign_alias(name: str, version: str, score: float | None, suite: str) -> dict[str, Any]:
    """``champion`` when ``score`` beats the champion's on the same suite, else ``challenger``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    client.set_model_version_tag(name, version, "eval_suite", suite)
    if score is not None:
        client.set_model_version_tag(name, version, "average_psnr", f"{score:.6f}")
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    reason = _verdict(current, score, suite)
    alias = CHAMPION if reason.startswith("beats") or reason == "first model" else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "alias": alias, "reason": reason}


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


def register_weights(pipeline: Pipeline, weights: Path | None, summary: dict[str, Any], say=print):
    if weights is None:
        return None
    suite = "all-in-one:" + ",".join(pipeline.config.tasks)
    result = log_and_register(
        load_weights(pipeline, weights), DEFAULT_NAME, summary["final"], suite
    )
    say(
        f"registered {result['name']} v{result['version']} as @{result['alias']} "
        f"({result['reason']})"
    )
    return result
