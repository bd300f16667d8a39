"""A pipeline file loaded whole: its config validated, its tasks loaded, its paths resolved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from allinone.config.loading import (
    ConfigError,
    check_variables,
    expand_env,
    load_yaml,
    validate,
)
from allinone.config.pipeline import PipelineConfig, check_model
from allinone.config.study import check_study
from allinone.config.task import TaskConfig, load_task


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline with its task configs loaded and its paths resolved."""

    config: PipelineConfig
    path: Path
    tasks: dict[str, TaskConfig]  # training tasks then unseen tasks, by name

    @property
    def folder(self) -> Path:
        return self.path.parent

    def task_path(self, name: str) -> Path:
        return task_file(self.config, self.folder, name)

    @property
    def pretrained(self) -> Path | None:
        """``model.pretrained``: our own checkpoint the first stage starts from."""
        if self.config.model.pretrained is None:
            return None
        path = Path(expand_env(self.config.model.pretrained))
        return path if path.is_absolute() else (self.folder / path).resolve()


def task_file(config: PipelineConfig, folder: Path, name: str) -> Path:
    return (folder / expand_env(config.tasks_dir) / f"{name}.yaml").resolve()


def _path_fields(config: PipelineConfig) -> dict[str, str | None]:
    """The pipeline's fields that may hold ``${VAR}``, by their names in the file."""
    data = config.data
    return {
        "tasks_dir": config.tasks_dir,
        "data.train_source": data.train_source,
        "data.test_source": data.test_source,
        **{f"data.train_sources.{task}": v for task, v in data.train_sources.items()},
        **{f"data.test_sources.{task}": v for task, v in data.test_sources.items()},
        "eval.data": config.eval.data,
        "model.pretrained": config.model.pretrained,
        "data.shards": data.shards,
        "train.storage": config.train.storage,
    }


def load_pipeline(path: str | Path) -> Pipeline:
    path = Path(path).resolve()
    config: PipelineConfig = validate(PipelineConfig, load_yaml(path), path)
    check_variables(path, _path_fields(config))
    check_model(config, path)
    tasks = {}
    for field_name in ("tasks", "unseen_tasks"):
        for i, name in enumerate(getattr(config, field_name)):
            file = task_file(config, path.parent, name)
            if not file.is_file():
                raise ConfigError(path, f"{field_name}.{i}", f"unknown task {name!r}: no {file}")
            tasks[name] = load_task(file)
    for name in config.unseen_tasks:
        if name in config.tasks:
            raise ConfigError(path, "unseen_tasks", f"{name!r} is also a training task")
    if config.tune is not None:
        check_study(config, path)
    pipeline = Pipeline(config, path, tasks)
    pretrained = pipeline.pretrained
    if pretrained is not None and not pretrained.is_file():
        raise ConfigError(path, "model.pretrained", f"weights file not found: {pretrained}")
    return pipeline
