"""Typed, validated configs for tasks (tasks/*.yaml) and jobs (pipelines/*.yaml).

Every YAML file is parsed here and nowhere else. A bad file raises :class:`ConfigError` naming the
file, the field and what is wrong; unknown keys are errors, never silently ignored.

Paths inside a YAML file may use ``${VAR}`` / ``${VAR:-default}`` and are resolved relative to the
file's own folder, so a config means the same thing whatever the working directory.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from allinone import degradations

SKIMAGE_SOURCE = "skimage"
TASK_NAME = r"^[a-z][a-z0-9_]*$"


class ConfigError(ValueError):
    """One clear message: which file, which field, what is wrong."""

    def __init__(self, path: str | Path, field: str, message: str) -> None:
        self.path, self.field, self.message = str(path), field, message
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- degradation steps
ParamValue = float | tuple[float, float]


class DegradationStep(Strict):
    """One op of a degradation chain: ``{op: gaussian_noise, sigma: [15, 50]}``."""

    op: str
    params: dict[str, ParamValue] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split_op_from_params(cls, data: Any) -> Any:
        if isinstance(data, dict) and "params" not in data:
            data = dict(data)
            return {"op": data.pop("op", None), "params": data}
        return data

    @model_validator(mode="after")
    def _check_op_and_params(self) -> DegradationStep:
        if self.op not in degradations.OPS:
            raise ValueError(
                f"unknown degradation op {self.op!r} (known: {sorted(degradations.OPS)})"
            )
        op = degradations.OPS[self.op]
        for name, value in self.params.items():
            problem = degradations.check_param(
                op, name, list(value) if isinstance(value, tuple) else value
            )
            if problem:
                raise ValueError(f"{self.op}.{name}: {problem}")
        return self

    def as_chain_item(self) -> tuple[str, dict[str, Any]]:
        return self.op, {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}


# --------------------------------------------------------------------------- tasks
class SplitConfig(Strict):
    """Where a split's images come from and how many samples each yields."""

    source: str | None = None  # "skimage", a folder, or None: must be given on the command line
    variants: int = Field(1, ge=1, le=1000)  # degraded samples drawn per clean image (synthetic)
    crop: int | None = Field(None, ge=16)  # store a centre crop of at most this size; None = full
    max_images: int | None = Field(None, ge=1)
    # Fixed settings for an evaluation protocol: one sample per level per image, each level
    # overriding the named parameters of every op in the chain that has them (e.g. sigma 15/25/50).
    levels: list[dict[str, float]] = Field(default_factory=list)
    # 90-degree turns among the training crops' augmentations; None: decided by the task
    # (TaskConfig.turns_in_training).
    turns: bool | None = None


class BenchmarkSet(Strict):
    """A standard test set for this task, found under the evaluation data root when present."""

    name: str
    path: str  # relative to the data root (``--data``), e.g. test/Rain100L
    layout: Literal["clean", "rain100l", "sots", "lq_gt"] = "clean"  # clean: degrade it ourselves
    levels: list[dict[str, float]] = Field(default_factory=list)  # clean sets: fixed settings


class TaskConfig(Strict):
    name: Annotated[str, Field(pattern=TASK_NAME)]
    description: str = ""
    kind: Literal["synthetic", "paired"]
    degrade: list[DegradationStep] = Field(default_factory=list)  # synthetic tasks only
    layout: Literal["rain100l", "sots", "lq_gt"] | None = None  # paired tasks only
    unseen: bool = False  # held out of training: a zero-shot / few-shot task
    train: SplitConfig = SplitConfig()
    test: SplitConfig = SplitConfig()
    benchmarks: list[BenchmarkSet] = Field(default_factory=list)
    # Pixels ignored at each border when scoring, as the protocol asks (SR: its scale): the
    # border of an upscaled image lacks the neighbours interpolation needs, in every method.
    crop_border: int = Field(0, ge=0)

    @property
    def turns_in_training(self) -> bool:
        """Whether training crops may be turned by 90 degrees (they are always mirrored).

        Not for degradations with a direction in the picture: turned rain is horizontal streaks,
        and a model taught to erase those erases horizontal texture too (Rain100L fell 0.85 dB,
        README "Quality"). Haze is turned although its depth proxy is far at the top: kept
        upright it did no better on SOTS (cpu-3task: 18.31 against 18.43 dB turned).
        """
        if self.train.turns is not None:
            return self.train.turns
        if self.kind == "paired":
            return self.layout != "rain100l"
        return not any(degradations.get_op(step.op).upright for step in self.degrade)

    @model_validator(mode="after")
    def _check_kind(self) -> TaskConfig:
        if self.kind == "synthetic":
            if not self.degrade:
                raise ValueError("a synthetic task needs a non-empty 'degrade' chain")
            if self.layout is not None:
                raise ValueError(
                    "'layout' is for paired tasks; a synthetic task degrades clean images"
                )
            for split in ("train", "test"):
                self._check_levels(split, getattr(self, split).levels)
            for i, bench in enumerate(self.benchmarks):
                self._check_levels(f"benchmarks.{i}", bench.levels)
        else:
            if self.layout is None:
                raise ValueError("a paired task needs 'layout' (rain100l, sots or lq_gt)")
            if self.degrade:
                raise ValueError("'degrade' is for synthetic tasks; a paired task reads real pairs")
        return self

    def _check_levels(self, split: str, levels: list[dict[str, float]]) -> None:
        for i, level in enumerate(levels):
            for name, value in level.items():
                owners = [
                    s
                    for s in self.degrade
                    if name in {p.name for p in degradations.OPS[s.op].params}
                ]
                if not owners:
                    raise ValueError(
                        f"{split}.levels.{i}.{name}: no op in 'degrade' has this parameter"
                    )
                for step in owners:
                    problem = degradations.check_param(degradations.OPS[step.op], name, value)
                    if problem:
                        raise ValueError(f"{split}.levels.{i}.{name}: {problem}")

    def split(self, name: str) -> SplitConfig:
        return self.train if name == "train" else self.test


# --------------------------------------------------------------------------- loading
def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "", "file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(path, "", f"not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "", "expected a mapping of fields at the top level")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where (1-based line and column) and what, without the
    snippet of the file it quotes over several lines."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + " ".join(problem.split())


def validate(model: type[BaseModel], data: dict[str, Any], path: str | Path) -> Any:
    """Validate ``data`` against ``model``; the first problem becomes one ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(path, _field_name(first), _message(first)) from None


def _field_name(error: dict[str, Any]) -> str:
    # Pydantic puts union-member and validator names in loc; keep only the user's own keys.
    parts = [str(p) for p in error["loc"] if not _is_internal_loc(p)]
    return ".".join(parts) or "(top level)"


def _is_internal_loc(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"function-after", "float", "tuple"})


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field (check the spelling)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "missing" and "input" in error and not isinstance(error["input"], dict):
        message += f" (got {error['input']!r})"
    return message


def load_task(path: str | Path) -> TaskConfig:
    return validate(TaskConfig, load_yaml(path), path)


# --------------------------------------------------------------------------- paths
_ENV_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is an error."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            raise ValueError(f"environment variable {name} is not set and has no default")
        return value

    return _ENV_VAR.sub(substitute, text)


def resolve_source(source: str, relative_to: Path, origin: str | Path, field: str) -> str | Path:
    """Turn a configured source into ``"skimage"`` or an existing folder; errors name the field."""
    if source == SKIMAGE_SOURCE:
        return SKIMAGE_SOURCE
    try:
        folder = Path(expand_env(source))
    except ValueError as err:
        raise ConfigError(origin, field, str(err)) from None
    folder = folder if folder.is_absolute() else (relative_to / folder)
    if not folder.is_dir():
        raise ConfigError(origin, field, f"data folder does not exist: {folder}")
    return folder.resolve()


# --------------------------------------------------------------------------- pipelines
class ModelSection(BaseModel):
    """``{name: promptir, preset: tiny, prompt_len: 5, ...}``: extra keys override the preset."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str
    preset: str = "tiny"
    # Our own checkpoint (a model.pt of this architecture) the first stage starts from; a
    # component's weights (CLIP, a diffusers folder) go to the model's own pretrained_* argument.
    pretrained: str | None = None

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataSection(Strict):
    samples_per_shard: int = Field(64, ge=1)
    crop: int = Field(64, ge=16)  # random training crop taken by the stream
    batch_size: int = Field(8, ge=1)  # per worker
    train_source: str | None = None  # overrides every task's train.source (e.g. a photo folder)
    test_source: str | None = None  # overrides every synthetic task's test.source
    # Per task, e.g. {rain100l: /data/Rain100L/train}: a paired task's own dataset root.
    train_sources: dict[str, str] = Field(default_factory=dict)
    test_sources: dict[str, str] = Field(default_factory=dict)


class CurriculumSection(Strict):
    mode: Literal["cumulative", "sequential", "mixed"] = "cumulative"
    steps: list[
        Annotated[int, Field(ge=1)]
    ]  # per stage, in task order (mixed: one entry or the sum)
    weights: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)


class TrainSection(Strict):
    optimizer: Literal["adamw", "adam"] = "adamw"  # adam: weight decay as L2, adamw: decoupled
    lr: float = Field(2e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    pixel_loss: Literal["l1", "charbonnier", "psnr"] = "l1"
    aux_weights: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    zero_stage: int = Field(0, ge=0, le=3)
    offload_optimizer: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    use_gpu: bool = False
    num_workers: int = Field(1, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    # Score the test splits inside the stage every N steps (val/ curves; what ASHA reads).
    eval_every: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _check_precision(self) -> TrainSection:
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision fp16 needs use_gpu: true (use fp32 or bf16 on CPU)")
        return self


class FewShotSection(Strict):
    """Fine-tune a copy of the model on k pairs of an unseen task, for each k, for ``steps``."""

    k: list[Annotated[int, Field(ge=1)]] = Field([1, 5, 10], min_length=1)
    steps: int = Field(50, ge=1)
    lr: float = Field(1e-4, gt=0)
    crop: int = Field(64, ge=16)  # random training crop from the k pairs
    batch_size: int = Field(4, ge=1)

    @field_validator("k")
    @classmethod
    def _sorted_distinct(cls, ks: list[int]) -> list[int]:
        return sorted(set(ks))


class EvalSection(Strict):
    # Run at the end of a curriculum; every stage end scores the trained tasks' test splits.
    suites: list[Literal["all-in-one", "zero-shot", "few-shot", "all"]] = ["all-in-one"]
    max_images: int | None = Field(None, ge=1)
    tile: int | None = Field(None, ge=32)
    data: str | None = None  # a folder of standard test sets (CBSD68, Rain100L, SOTS, ...)
    baselines: bool = False  # classical methods scored on the same images, as extra rows
    grids: bool = True  # degraded / restored / ground truth PNGs under grids/
    few_shot: FewShotSection = FewShotSection()


class SearchDomain(Strict):
    """One searched field: exactly one of ``choice``, ``uniform``, ``loguniform`` or ``randint``
    (integers, both ends included)."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_valid_range(self) -> SearchDomain:
        given = [name for name in DOMAINS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAINS)} (got {given or 'none'})")
        if self.choice is not None:
            return self
        low, high = getattr(self, given[0])
        if not low < high:
            raise ValueError(f"{given[0]}: empty or inverted range [{low}, {high}]")
        if self.loguniform is not None and low <= 0:
            raise ValueError(f"loguniform: the range must be positive, got [{low}, {high}]")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DOMAINS if getattr(self, name) is not None)

    def bounds(self) -> list[Any]:
        """The values a trial can take at the edges of the domain (every choice)."""
        return list(self.choice) if self.choice is not None else list(getattr(self, self.kind))


DOMAINS = ("choice", "uniform", "loguniform", "randint")


class AshaSection(Strict):
    """ASHA's rungs, in curriculum steps: the first at ``grace_steps``, then every
    ``reduction_factor`` times further; at each rung only the best 1/reduction_factor go on."""

    grace_steps: int | None = Field(None, ge=1)  # default: the first evaluation (eval_every)
    reduction_factor: float = Field(3.0, gt=1)


class TuneSection(Strict):
    """A Ray Tune study over fields of this pipeline (``allinone tune``)."""

    # A suite's metric: all-in-one/average_psnr, all-in-one/<task>/psnr, zero-shot/..., ssim too.
    metric: str = "all-in-one/average_psnr"
    mode: Literal["max", "min"] = "max"
    search: Literal["optuna", "random"] = "optuna"
    scheduler: Literal["asha", "fifo"] = "asha"
    asha: AshaSection = AshaSection()
    num_samples: int = Field(8, ge=1)
    # Default: as many trials at once as the cluster fits; with optuna at most one per four
    # trials, so that most trials are suggested from finished ones.
    max_concurrent: int | None = Field(None, ge=1)
    eval_every: int = Field(50, ge=1)  # steps between the evaluations ASHA reads
    register_best: bool = True  # the best completed trial's model, by the registry's rules
    space: dict[str, SearchDomain] = Field(min_length=1)


class PipelineConfig(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    seed: int = 0
    tasks: list[str] = Field(min_length=1)  # curriculum order: names of files in tasks_dir
    unseen_tasks: list[str] = Field(default_factory=list)  # zero-/few-shot evaluation only
    tasks_dir: str = "../tasks"
    data: DataSection = DataSection()
    model: ModelSection
    curriculum: CurriculumSection
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    tune: TuneSection | None = None  # a study's search space, objective and scheduler

    @field_validator("tasks", "unseen_tasks")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"tasks listed twice: {duplicated}")
        return names

    @model_validator(mode="after")
    def _check_stages(self) -> PipelineConfig:
        stages = 1 if self.curriculum.mode == "mixed" else len(self.tasks)
        if len(self.curriculum.steps) != stages:
            raise ValueError(
                f"curriculum.steps: {self.curriculum.mode} with {len(self.tasks)} tasks needs "
                f"{stages} stage length(s), got {len(self.curriculum.steps)}"
            )
        unknown = sorted(set(self.curriculum.weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"curriculum.weights: not tasks of this pipeline: {unknown}")
        for field in ("train_sources", "test_sources"):
            named = set(getattr(self.data, field))
            unknown = sorted(named - set(self.tasks) - set(self.unseen_tasks))
            if unknown:
                raise ValueError(f"data.{field}: not tasks of this pipeline: {unknown}")
        return self


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
        from allinone.tune import check_study

        check_study(config, path)
    pipeline = Pipeline(config, path, tasks)
    try:
        pretrained = pipeline.pretrained
    except ValueError as err:  # an unset ${VAR} in the path
        raise ConfigError(path, "model.pretrained", str(err)) from None
    if pretrained is not None and not pretrained.is_file():
        raise ConfigError(path, "model.pretrained", f"weights file not found: {pretrained}")
    return pipeline


def check_model(config: PipelineConfig, path: Path) -> None:
    from allinone.models import MODELS  # the zoo imports torch: only when a pipeline is loaded

    entry = MODELS.get(config.model.name)
    if entry is None:
        raise ConfigError(
            path, "model.name", f"unknown model {config.model.name!r} (known: {sorted(MODELS)})"
        )
    if config.model.preset not in entry.presets:
        raise ConfigError(
            path,
            "model.preset",
            f"{config.model.name} has no preset {config.model.preset!r} "
            f"(presets: {sorted(entry.presets)})",
        )
    parameters = inspect.signature(entry.builder).parameters.values()
    accepted = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if len(accepted) < len(parameters):  # a builder passing **kwargs on: its presets' keys
        accepted |= {key for preset in entry.presets.values() for key in preset}
    accepted.discard("task_names")  # set from the pipeline's tasks
    for key in config.model.overrides:
        if key not in accepted:
            raise ConfigError(
                path,
                f"model.{key}",
                f"unknown field for model {config.model.name} (accepted: {sorted(accepted)})",
            )
