"""What one run is told (:class:`RunOptions`) and what its work directory remembers
(:class:`RunState`) so that ``--resume`` continues where a killed driver stopped."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from allinone.base.files import write_atomic
from allinone.config import Pipeline
from allinone.train.job import FaultInjection

STATE = "state.json"


class CurriculumError(RuntimeError):
    """A stage that cannot continue; the message says which and why."""


@dataclass(frozen=True)
class RunOptions:
    """How one curriculum runs: where, tracked where, and what a caller (a study) adds."""

    workdir: Path
    tracking_uri: str | None = None
    address: str | None = None
    resume: bool = False
    register: bool = True
    fault: FaultInjection | None = None  # test hook: kill a worker once at a step
    shards: Path | None = None  # shards built beforehand (a study's trials share them)
    parent_run_id: str | None = None  # nest the curriculum's MLflow run under this one
    tags: dict[str, str] = field(default_factory=dict)  # set on the curriculum's MLflow run
    train_callbacks: tuple[Any, ...] = ()  # Ray Train callbacks, e.g. Tune's reporting one
    # The curriculum's last scores are the caller's to report (a study's trial reports them once
    # the run has ended, so that a scheduler stopping at its final step cannot cut the end short).
    hold_final_scores: bool = False

    @property
    def shard_root(self) -> Path:
        return (self.shards or self.workdir / "shards").resolve()


@dataclass
class RunState:
    """What a work directory remembers between driver processes."""

    pipeline: str
    parent_run_id: str | None = None
    stage_runs: dict[str, str] = field(default_factory=dict)  # stage name -> MLflow run id
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> weights, scores
    attempt: str = ""  # suffix of Ray Train run names; a fresh run never picks up old checkpoints

    @classmethod
    def open(cls, workdir: Path, pipeline: Pipeline, resume: bool) -> RunState:
        path = workdir / STATE
        if not path.is_file():
            return cls(pipeline=pipeline.config.name, attempt=os.urandom(4).hex())
        if not resume:
            raise CurriculumError(
                f"{workdir} holds an earlier run of {pipeline.config.name}: "
                "pass --resume to continue it, or choose another --workdir"
            )
        state = cls(**json.loads(path.read_text()))
        if state.pipeline != pipeline.config.name:
            raise CurriculumError(
                f"{path}: belongs to pipeline {state.pipeline!r}, not {pipeline.config.name!r}"
            )
        return state

    def save(self, workdir: Path) -> None:
        write_atomic(workdir / STATE, json.dumps(asdict(self), indent=2))
