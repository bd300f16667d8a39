"""A pipeline's ``tune:`` block checked before any trial starts: every searched field must be one
a trial may set, every edge of its domain a valid value, the objective a metric trials report.

Also the rules a trial's config is made by (:func:`apply_values`), so that a study and its trials
agree on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from allinone.config.loading import ConfigError, validate
from allinone.config.pipeline import ModelSection, PipelineConfig, check_model

TUNABLE = ("model.", "train.", "curriculum.", "data.crop", "data.batch_size")
# Fields a trial may not change: they decide resources, the stage plan or the study's own clock.
FIXED = {
    "model.name",
    "model.preset",
    "model.pretrained",
    "curriculum.mode",
    "train.num_workers",
    "train.use_gpu",
    "train.threads_per_worker",
    "train.eval_every",
    "train.checkpoint_every",
}


def validation_metric_names(suite: str, tasks: list[str] | tuple[str, ...]) -> list[str]:
    """The metrics a run reports at each in-stage evaluation of a suite: per task, and averaged."""
    names = [f"{suite}/{task}/{m}" for task in tasks for m in ("psnr", "ssim")]
    return [*names, f"{suite}/average_psnr", f"{suite}/average_ssim"]


# --------------------------------------------------------------------------- checking a study
def check_study(config: PipelineConfig, path: Path) -> None:
    """Reject a bad ``tune:`` block before any trial starts, naming the field."""
    study = config.tune
    assert study is not None
    for name, domain in study.space.items():
        where = f"tune.space.{name}"
        problem = _unsettable(config, name)
        if problem:
            raise ConfigError(path, where, problem)
        for value in domain.bounds():
            try:
                apply_values(config, {name: value}, path)
            except ConfigError as err:
                raise ConfigError(
                    path, where, f"the value {value!r} is invalid for {err.field}: {err.message}"
                ) from None
    _check_metric(config, path)
    longest = max_curriculum_steps(config)
    if study.asha.grace_steps is not None and study.asha.grace_steps >= longest:
        raise ConfigError(
            path,
            "tune.asha.grace_steps",
            f"{study.asha.grace_steps} is not below the curriculum's {longest} steps",
        )


def _unsettable(config: PipelineConfig, name: str) -> str | None:
    """Why a dotted path names no field a trial may set, or None when it does."""
    if name in FIXED or not name.startswith(TUNABLE):
        return (
            "not a tunable field (tunable: model.*, train.*, curriculum.*, data.crop, "
            f"data.batch_size; fixed: {', '.join(sorted(FIXED))})"
        )
    node: Any = config
    parts = name.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, ModelSection) and part not in type(node).model_fields:
            # A constructor argument: check_model knows which the model accepts.
            return None if depth == len(parts) - 1 else f"{here} is a value, not a section"
        if isinstance(node, BaseModel):
            if part not in type(node).model_fields:
                return f"{here} names no config field"
            node = getattr(node, part)
        elif isinstance(node, dict):
            node = node.get(part)  # an open mapping (loss weights, task weights): any key
        elif isinstance(node, list | tuple):
            if not part.isdigit() or int(part) >= len(node):
                return f"{here}: no item {part} (the list has {len(node)})"
            node = node[int(part)]
        else:
            return f"{here} is a value, not a section"
    return None


def available_metrics(config: PipelineConfig) -> list[str]:
    """Every metric a trial reports at each evaluation."""
    names = validation_metric_names("all-in-one", config.tasks)
    if config.unseen_tasks:
        names += validation_metric_names("zero-shot", config.unseen_tasks)
    return names


def _check_metric(config: PipelineConfig, path: Path) -> None:
    metric = config.tune.metric
    known = available_metrics(config)
    if metric in known:
        return
    why = (
        "few-shot scores exist only after fine-tuning a finished model, so neither ASHA nor "
        "the search can read them during a trial"
        if metric.startswith("few-shot")
        else "no evaluation suite of this pipeline reports it"
    )
    raise ConfigError(path, "tune.metric", f"{metric!r}: {why} (known: {', '.join(known)})")


def max_curriculum_steps(config: PipelineConfig) -> int:
    """The longest curriculum a trial can get (stage lengths may be searched)."""
    steps = list(config.curriculum.steps)
    for name, domain in config.tune.space.items():
        parts = name.split(".")
        if parts[:2] == ["curriculum", "steps"] and len(parts) == 3:
            steps[int(parts[2])] = max(int(v) for v in domain.bounds())
    return sum(steps)


# --------------------------------------------------------------------------- trial configs
def apply_values(config: PipelineConfig, values: dict[str, Any], path: Path) -> PipelineConfig:
    """The pipeline with the given dotted fields set, validated like a YAML file."""
    data = config.model_dump(mode="json")
    for name, value in values.items():
        _set(data, name.split("."), value)
    changed: PipelineConfig = validate(PipelineConfig, data, path)
    check_model(changed, path)
    return changed


def _set(data: Any, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        data = data[int(part)] if isinstance(data, list) else data.setdefault(part, {})
    if isinstance(data, list):
        data[int(parts[-1])] = value
    else:
        data[parts[-1]] = value
