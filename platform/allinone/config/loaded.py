"""A pipeline file loaded whole: its config validated, its tasks loaded, its paths resolved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from allinone.config.loading import ConfigError, expand_env, load_yaml, validate
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


def load_pipeline(path: str | Path) -> Pipeline:
    path = Path(path).resolve()
    config: PipelineConfig = validate(PipelineConfig, load_yaml(path), path)
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
    try:
        pretrained = pipeline.pretrained
    except ValueError as err:  # an unset ${VAR} in the path
        raise ConfigError(path, "model.pretrained", str(err)) from None
    if pretrained is not None and not pretrained.is_file():
        raise ConfigError(path, "model.pretrained", f"weights file not found: {pretrained}")
    return pipeline
