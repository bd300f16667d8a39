"""Task configs (tasks/*.yaml): what degrades, which data, which test sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from allinone.config.loading import Strict, check_variables, load_yaml, validate
from allinone.data import degradations

TASK_NAME = r"^[a-z][a-z0-9_]*$"
# How a shard stores a sample's two images (allinone.data.members): PNG, or raw uint8 .npy arrays
MemberFormat = Literal["png", "npy"]


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
    # png: small and viewable; npy: 1.7x the bytes, decoded 40x faster (benchmarks/shards.py), so
    # the training stream spends a third of the CPU a crop (benchmarks/data_pipeline.py).
    members: MemberFormat = "png"


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


def load_task(path: str | Path) -> TaskConfig:
    task: TaskConfig = validate(TaskConfig, load_yaml(path), path)
    check_variables(path, {"train.source": task.train.source, "test.source": task.test.source})
    return task
