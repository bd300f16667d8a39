"""What a worker needs to train one stage: a frozen, typed value sent to every worker as it is."""

from __future__ import annotations

from dataclasses import dataclass

from allinone.config import TrainSection
from allinone.evaluate.scoring import TestSplit
from allinone.models.spec import ModelSpec

WEIGHTS_FILE = "model.pt"
STATE_FILE = "stage_state.json"
NONFINITE_FILE = "nonfinite.json"
CURRICULUM_STEP = "curriculum_step"  # steps since the curriculum began: ASHA's clock
STARTUP_METRIC = "startup_s"  # in a stage's final report: trainer.fit() to its first step


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: kill a worker once, hard, when it reaches ``at_step`` (``marker`` remembers);
    with ``after_checkpoint``, right after reporting that step's checkpoint, before Ray Train's
    controller has collected the report."""

    at_step: int
    marker: str
    after_checkpoint: bool = False


@dataclass(frozen=True)
class StageJob:
    stage: int
    stage_name: str
    steps: int
    model: ModelSpec  # its task names are the model's task ids, in curriculum order
    train: TrainSection
    batch_size: int
    seed: int
    init_weights: str | None = None  # previous stage's model.pt
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    # Where a worker leaves a verdict the driver must read: beside the checkpoints, on disk or in
    # object storage.
    status_dir: str | None = None
    step_offset: int = 0  # curriculum steps before this stage: x axis of the val/ curves
    curve_run_id: str | None = None  # the curriculum's MLflow run, where val/ curves go too
    eval_splits: tuple[TestSplit, ...] = ()  # scored every train.eval_every steps
    eval_images: int | None = None  # per task
    eval_tile: int | None = None
    hold_final_scores: bool = False  # the final report leaves out the curriculum clock
    shuffle_rows: int = 64  # the worker's local shuffle buffer, rows (stream.shuffle_buffer_rows)
    fault: FaultInjection | None = None
    # The driver's clock as it calls trainer.fit(): the stage's start-up ends at its first step.
    fit_called_at: float | None = None
