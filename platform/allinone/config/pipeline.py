"""Pipeline configs (pipelines/*.yaml): the curriculum, model, training, evaluation and study."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from allinone.config.loading import ConfigError, Strict

if TYPE_CHECKING:
    from allinone.models.spec import ModelSpec


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

    @model_validator(mode="after")
    def _finite_overrides(self) -> ModelSection:
        # Extra keys are untyped (they are the architecture's own arguments): check them here.
        for key, value in self.overrides.items():
            if not _all_finite(value):
                raise ValueError(f"{key}: must be finite numbers (got {value!r})")
        return self


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    return True


# Images larger than this are refused before decoding (decompression bombs are a few hundred KB
# that decode to gigabytes): generous for photos (a 45 MP camera's frames pass), and it bounds a
# build's memory, about 40 bytes per pixel while a sample is degraded and encoded (measured).
DEFAULT_MAX_PIXELS = 50_000_000


class DataSection(Strict):
    samples_per_shard: int = Field(64, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # per source image, width x height
    crop: int = Field(64, ge=16)  # random training crop taken by the stream
    batch_size: int = Field(8, ge=1)  # per worker
    # Random crops cut from each decoded training sample (decoding costs more than cropping)
    crops_per_sample: int = Field(1, ge=1, le=64)
    train_source: str | None = None  # overrides every task's train.source (e.g. a photo folder)
    test_source: str | None = None  # overrides every synthetic task's test.source
    # Per task, e.g. {rain100l: /data/Rain100L/train}: a paired task's own dataset root.
    train_sources: dict[str, str] = Field(default_factory=dict)
    test_sources: dict[str, str] = Field(default_factory=dict)
    # Where the run builds and reads its shards: a folder or an object-storage URI
    # (s3://bucket/prefix); default <workdir>/shards.
    shards: str | None = None


class ComponentStage(Strict):
    """A stage that trains one component of the model alone, on every task, the rest frozen:
    MiOIR's degradation classifier (``trains: classifier``) after the curriculum, MPerceiver's
    degradation predictor before it (``trains: predictor, before: true``: the prompts it weighs
    are trained with it frozen) and its refinement decoder after. The model's ``trains``
    argument names what it can train so."""

    trains: Annotated[str, Field(pattern=r"^[a-z][a-z_]*$")]
    steps: int = Field(ge=1)
    before: bool = False  # ahead of the curriculum's stages, else after them


class CurriculumSection(Strict):
    mode: Literal["cumulative", "sequential", "mixed"] = "cumulative"
    steps: list[
        Annotated[int, Field(ge=1)]
    ]  # per stage, in task order (mixed: one entry or the sum)
    weights: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    components: list[ComponentStage] = Field(default_factory=list)  # in order, before or after


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
    # NHWC activations (convolutions follow them): faster on tensor cores, rarely on a CPU.
    channels_last: bool = False
    # torch.compile through DeepSpeed's engine.compile; "eager" and "aot_eager" check the path
    # without code generation (tests), "inductor" is the one that speeds training up.
    compile: Literal["off", "inductor", "aot_eager", "eager"] = "off"
    num_workers: int = Field(1, ge=1)
    threads_per_worker: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    # Score the test splits inside the stage every N steps (val/ curves; what ASHA reads).
    eval_every: int | None = Field(None, ge=1)
    # A sampling model (perceiver) validates with this many DDIM steps, not its own (50 in the
    # paper): the scores are a curve to follow, the stage-end and final evaluations use its own.
    eval_sample_steps: int = Field(10, ge=1)
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(2, ge=0)
    # Ray Train's storage_path: the stages' checkpoints and the weights each stage starts from, a
    # folder or an object-storage URI (s3://bucket/prefix); default <workdir>/ray. --storage wins.
    storage: str | None = None

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
    # 4: Ray's default and the ASHA paper's. With trials run one after another the first to reach
    # a rung always goes on (nothing recorded to compare with), so 3 kept too many going:
    # benchmarks/tune_efficiency.py measured 0.52x full budgets' trial-steps at 3.
    reduction_factor: float = Field(4.0, gt=1)


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

    @property
    def model_spec(self) -> ModelSpec:
        """The network this pipeline trains: its model section, with the tasks as task ids."""
        from allinone.models.spec import ModelSpec  # the zoo imports torch: only when asked

        return ModelSpec(
            self.model.name, self.model.preset, self.model.overrides, tuple(self.tasks)
        )

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


def check_model(config: PipelineConfig, path: Path) -> None:
    """The model section names a registered architecture, one of its presets, and only
    constructor arguments that architecture accepts."""
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
    if config.curriculum.components and "trains" not in accepted:
        raise ConfigError(
            path,
            "curriculum.components.0.trains",
            f"model {config.model.name} has no component it trains on its own",
        )
    for key in config.model.overrides:
        if key not in accepted:
            raise ConfigError(
                path,
                f"model.{key}",
                f"unknown field for model {config.model.name} (accepted: {sorted(accepted)})",
            )
