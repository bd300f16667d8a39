"""One curriculum stage on one Ray Train worker: a DeepSpeed engine fed by the stage's stream.

``train_stage`` is the ``train_loop_per_worker`` of a ``TorchTrainer``. It builds the model (from
the previous stage's weights when there are some), wraps it in DeepSpeed (ZeRO 0-3, optimizer and
CPU offload from the pipeline), and trains for the stage's steps, reporting metrics and a
checkpoint every ``checkpoint_every`` steps. A restarted worker resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from allinone.config import TrainSection
from allinone.data.stream import to_model_batch
from allinone.evaluate.scoring import validation_metrics
from allinone.models.weights import load_state_file
from allinone.train.job import (
    CURRICULUM_STEP,
    NONFINITE_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    FaultInjection,
    StageJob,
)
from allinone.train.losses import total_loss

DS_TAG = "engine"


# --------------------------------------------------------------------------- DeepSpeed config
def deepspeed_config(train: TrainSection, batch_size: int, world_size: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "train_batch_size": batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,  # progress is ours; DeepSpeed's own lines would double it
        "wall_clock_breakdown": False,
    }
    if train.grad_clip:
        config["gradient_clipping"] = train.grad_clip
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    if train.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        kind = {"adamw": "AdamW", "adam": "Adam"}[train.optimizer]
        config["optimizer"] = {"type": kind, "params": _adam_params(train)}
    return config


def _adam_params(train: TrainSection) -> dict[str, Any]:
    return {"lr": train.lr, "betas": list(train.betas), "weight_decay": train.weight_decay}


def cosine_with_warmup(train: TrainSection, steps: int):
    """LR multiplier: linear warmup, then cosine down to min_lr (restarted every stage)."""
    floor = train.min_lr / train.lr

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = (step - train.warmup_steps) / max(1, steps - train.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --------------------------------------------------------------------------- the worker loop
def train_stage(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``config["job"]`` is the :class:`StageJob`."""
    import deepspeed  # imported in the worker: it probes accelerators and builds ops at import
    import ray.train

    job: StageJob = config["job"]
    train = job.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _set_threads(train, context.get_local_world_size())
    torch.manual_seed(job.seed + rank)

    model = build_model(job)
    engine = _engine(deepspeed, model, train, job, world)
    ema = Ema(model, train.ema_decay) if train.ema_decay else None
    step = _restore(engine, ema, ray.train.get_checkpoint())
    logger = StepLogger(job, rank) if rank == 0 else None
    validator = Validator(job, rank)

    device = engine.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision, torch.float32)
    stream = ray.train.get_dataset_shard("train")
    batches = stream.iter_torch_batches(
        batch_size=job.batch_size, drop_last=True, local_shuffle_buffer_size=job.shuffle_rows
    )
    started = time.perf_counter()
    for batch in _forever(batches, stream, job.batch_size, job.shuffle_rows):
        if step >= job.steps:
            break
        _maybe_inject_failure(job.fault, step)
        lq, gt, task_id = _to_device(batch, device, dtype)
        loss, parts = _loss(engine, lq, gt, task_id, train)
        if not math.isfinite(parts["total"]):
            _record_nonfinite(job, step + 1, parts["total"])
            return
        engine.backward(loss)
        engine.step()
        if ema:
            ema.update(engine.module)
        step += 1
        if logger:
            logger.log(
                step, parts, engine.get_lr()[0], lq.shape[0] * world, time.perf_counter() - started
            )
        started = time.perf_counter()
        final = step == job.steps
        evaluate = bool(job.eval_splits) and (final or step % (train.eval_every or step) == 0)
        save = final or step % train.checkpoint_every == 0
        if evaluate or save:
            weights = consolidated_weights(engine, ema)  # every rank: ZeRO-3 gathers
            scores = validator.scores(weights, device) if evaluate else {}
            if logger and scores:
                logger.log_validation(step, scores)
            _report(engine, ema, job, step, parts, scores, weights if save else None)


def _forever(batches, stream, batch_size: int, shuffle_rows: int):
    """The planned pass normally covers the budget; should it run dry, start another pass."""
    while True:
        yield from batches
        batches = stream.iter_torch_batches(
            batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=shuffle_rows
        )


def _set_threads(train: TrainSection, workers_on_node: int) -> None:
    # Ray sets OMP_NUM_THREADS from the worker's reserved CPUs (1 by default): decide deliberately.
    threads = train.threads_per_worker or max(1, (os.cpu_count() or 1) // workers_on_node)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def build_model(job: StageJob, with_init: bool = True):
    model = job.model.build()
    if job.init_weights and with_init:
        load_state_file(model, job.init_weights, "the stage's initial")
    return model


OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def _engine(deepspeed, model, train: TrainSection, job: StageJob, world: int):
    config = deepspeed_config(train, job.batch_size, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = (
        None
        if train.offload_optimizer  # DeepSpeed's own CPU optimizer, from the config
        else OPTIMIZERS[train.optimizer](trainable, **_adam_params(train))
    )
    factor = cosine_with_warmup(train, job.steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        optimizer=optimizer,
        config=config,
        # A callable: DeepSpeed hands it the bare optimizer, steps it in engine.step() and keeps
        # its state in the engine's checkpoints.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        dist_init_required=False,
    )
    return engine


def _to_device(batch, device, dtype):
    return to_model_batch(batch, device=str(device), dtype=dtype)


def _loss(engine, lq, gt, task_id, train: TrainSection):
    out = engine(lq, task_id, with_aux=True, target=gt)
    weights = aux_weights(engine.module, train.aux_weights)
    loss, parts = total_loss(out, gt.float(), task_id, train.pixel_loss, weights)
    parts["total"] = float(loss.detach())
    return loss, parts


def aux_weights(model: torch.nn.Module, configured: dict[str, float]) -> dict[str, float]:
    """The model's own weights for its auxiliary terms, overridden by the pipeline's."""
    return {**getattr(model, "default_aux_weights", {}), **configured}


# --------------------------------------------------------------------------- reports
class Validator:
    """Scores the current weights on the test splits (``job.eval_sets``) on rank 0.

    Rank 0 alone restores images, in fp32 on its device, with a model built once and refilled
    with the consolidated weights (EMA's, when kept) each time."""

    def __init__(self, job: StageJob, rank: int) -> None:
        self.job, self.rank, self.model = job, rank, None

    def scores(self, weights: dict[str, torch.Tensor], device) -> dict[str, float]:
        if self.rank != 0:
            return {}
        if self.model is None:
            self.model = build_model(self.job, with_init=False).to(device)
        self.model.load_state_dict(weights)
        return validation_metrics(
            self.model, self.job.eval_splits, self.job.eval_images, self.job.eval_tile
        )


def _report(
    engine,
    ema,
    job: StageJob,
    step: int,
    parts: dict,
    scores: dict[str, float],
    weights: dict[str, torch.Tensor] | None,
) -> None:
    """Metrics, with the validation scores when this step was evaluated, and with ``weights``
    a checkpoint: the DeepSpeed state to resume from and the consolidated weights."""
    import ray.train

    final = step == job.steps
    metrics = {"step": step, "loss": parts["total"], "final": final, **scores}
    if not (final and job.hold_final_scores):  # without its clock, a scheduler passes it by
        metrics[CURRICULUM_STEP] = job.step_offset + step
    if weights is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=DS_TAG, client_state={"step": step})
        if ray.train.get_context().get_world_rank() == 0:
            torch.save(weights, Path(folder) / WEIGHTS_FILE)
            if ema:
                torch.save(ema.state_dict(), Path(folder) / "ema.pt")
            state = {
                "stage": job.stage,
                "step": step,
                "final": final,
                "model": job.model.to_json(),
            }
            (Path(folder) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def consolidated_weights(engine, ema) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (gathered under ZeRO-3): what the next stage starts from."""
    if ema is not None:
        return {k: v.detach().float().clone() for k, v in ema.shadow.items()}
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(
            list(engine.module.parameters()), modifier_rank=None
        ):
            return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def _restore(engine, ema, checkpoint) -> int:
    """Resume a restarted worker from the stage's last checkpoint; 0 when starting fresh."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        _, client_state = engine.load_checkpoint(folder, tag=DS_TAG)
        if ema and (Path(folder) / "ema.pt").is_file():
            ema.load_state_dict(torch.load(Path(folder) / "ema.pt", weights_only=True))
    return int(client_state["step"])


def _record_nonfinite(job: StageJob, step: int, loss: float) -> None:
    """Leave the verdict for the driver and stop without touching any checkpoint.

    Not raised: Ray Train retries every worker error, and a diverged run fails the same way each
    time. Not reported: a report without a checkpoint never reaches the driver's Result.
    """
    import ray.train

    if ray.train.get_context().get_world_rank() == 0 and job.status_dir:
        Path(job.status_dir).mkdir(parents=True, exist_ok=True)
        (Path(job.status_dir) / NONFINITE_FILE).write_text(
            json.dumps({"step": step, "loss": str(loss)})
        )


def _maybe_inject_failure(fault: FaultInjection | None, step: int) -> None:
    """Test hook: kill this process once, hard, to exercise Ray Train's worker restart."""
    if fault is None or step != fault.at_step:
        return
    marker = Path(fault.marker)
    if marker.exists():
        return
    marker.write_text(str(step))
    # Ray Train's controller collects reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): a
    # crash sooner than that after a report can lose it. Die once it has surely been collected.
    time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 1.0)
    os._exit(1)


# --------------------------------------------------------------------------- EMA and logging
class Ema:
    """Exponential moving average of the weights, kept in fp32 beside the engine's."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[name].lerp_(value.float(), 1 - self.decay)
            else:
                self.shadow[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.float().clone() for k, v in state.items()}


class StepLogger:
    """Rank 0's progress line and MLflow metrics (loss, its parts, lr, samples/s)."""

    def __init__(self, job: StageJob, rank: int) -> None:
        self.job, self.every = job, job.train.log_every
        self.client = None
        if job.tracking_uri and job.mlflow_run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(job.tracking_uri)
        self.window: list[tuple[float, float]] = []

    def log(
        self, step: int, parts: dict[str, float], lr: float, samples: int, seconds: float
    ) -> None:
        self.window.append((samples, seconds))
        if step % self.every and step != self.job.steps:
            return
        rate = sum(s for s, _ in self.window) / max(1e-9, sum(t for _, t in self.window))
        self.window.clear()
        print(
            f"[{self.job.stage_name}] step {step}/{self.job.steps} loss {parts['total']:.4f} "
            f"lr {lr:.2e} {rate:.1f} samples/s",
            flush=True,
        )
        if self.client:
            named = {("loss" if k == "total" else k): v for k, v in parts.items()}
            self._to_mlflow(
                step,
                {
                    **{f"train/{k}": v for k, v in named.items()},
                    "train/lr": lr,
                    "train/samples_per_s": rate,
                },
            )

    def log_validation(self, step: int, scores: dict[str, float]) -> None:
        """Validation scores: one line, the stage run's curve (stage steps) and the
        curriculum run's (curriculum steps, so stages join into one curve)."""
        averages = {k: v for k, v in scores.items() if k.endswith("/average_psnr")}
        print(
            f"[{self.job.stage_name}] step {step}/{self.job.steps} "
            + " ".join(f"{k} {v:.2f} dB" for k, v in averages.items()),
            flush=True,
        )
        if self.client:
            values = {f"val/{k}": v for k, v in scores.items()}
            self._to_mlflow(step, values)
            if self.job.curve_run_id:
                self._to_mlflow(self.job.step_offset + step, values, self.job.curve_run_id)

    def _to_mlflow(self, step: int, values: dict[str, float], run_id: str | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(run_id or self.job.mlflow_run_id, metrics=metrics)
