"""One curriculum stage on one Ray Train worker: a DeepSpeed engine fed by the stage's stream.

``train_stage`` is the ``train_loop_per_worker`` of a ``TorchTrainer``. It builds the model (from
the previous stage's weights when there are some), wraps it in DeepSpeed (ZeRO 0-3, optimizer and
CPU offload from the pipeline), and trains for the stage's steps, reporting metrics and a
checkpoint every ``checkpoint_every`` steps. A restarted worker resumes from the last checkpoint.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from allinone.config import TrainSection
from allinone.data import storage
from allinone.data.stream import shuffled_batches, to_model_batch
from allinone.evaluate.scoring import validation_metrics
from allinone.models.weights import load_state_file
from allinone.train.job import (
    CURRICULUM_STEP,
    NONFINITE_FILE,
    STARTUP_METRIC,
    STATE_FILE,
    WEIGHTS_FILE,
    FaultInjection,
    StageJob,
)
from allinone.train.losses import total_loss

DS_TAG = "engine"
# DeepSpeed's built ops, in the virtual environment: the Makefile builds them there too.
EXTENSIONS_DIR = "torch_extensions"


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
    _build_ops_as_make_does()
    import deepspeed  # imported in the worker: it probes accelerators and builds ops at import
    import ray.train

    job: StageJob = config["job"]
    train = job.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _set_threads(train, context.get_local_world_size())
    torch.manual_seed(job.seed + rank)

    stream = ray.train.get_dataset_shard("train")
    batches = FetchedAhead(_forever(stream, job.batch_size, job.shuffle_rows, job.seed + rank))
    model = build_model(job)
    if hasattr(model, "seed_training"):  # a model that draws noise and timesteps (diffusion)
        model.seed_training(job.seed + rank)
    engine = _engine(deepspeed, model, train, job, world)
    if train.compile != "off":
        engine.compile(backend=train.compile)
    ema = Ema(model, train.ema_decay) if train.ema_decay else None
    step = _restore(engine, ema, ray.train.get_checkpoint())
    logger = StepLogger(job, rank) if rank == 0 else None
    if logger and step:
        logger.log_resume(step)
    validator = Validator(job, rank)

    device = engine.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision, torch.float32)
    started, startup = time.perf_counter(), None
    for batch in batches:
        if step >= job.steps:
            break
        _maybe_inject_failure(job.fault, step, after_checkpoint=False)
        lq, gt, task_id = _to_device(batch, device, dtype, train.channels_last)
        loss, parts = _loss(engine, lq, gt, task_id, train)
        if not math.isfinite(parts["total"]):
            _record_nonfinite(job, step + 1, "loss", parts["total"])
            return
        engine.backward(loss)
        engine.step()
        if ema:
            ema.update(engine.module)
        step += 1
        if startup is None:
            startup = time.time() - job.fit_called_at if job.fit_called_at else 0.0
            if logger:
                logger.log_startup(step, startup)
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
            # The loss was finite before this step's update; what the update made may not be
            # (an infinite learning rate, an overflow): nothing non-finite is scored or saved.
            if not _all_finite(engine, weights, ema is not None):
                _record_nonfinite(job, step, "weights", parts["total"])
                return
            scores = validator.scores(weights, device) if evaluate else {}
            if logger and scores:
                logger.log_validation(step, scores)
            scores = {**scores, STARTUP_METRIC: startup} if final else scores
            _report(engine, ema, job, step, parts, scores, weights if save else None)


def _build_ops_as_make_does() -> None:
    """Build and load DeepSpeed's ops as ``make`` built them at install: with this Python's own
    ``bin`` first on PATH, as an activated virtual environment has it, and into a cache of this
    virtual environment's own.

    DeepSpeed builds its CPU collective op with whichever ``ninja`` PATH finds first: the one
    pip installs beside DeepSpeed (1.13) or a system one (Debian's 1.11). Each keeps a build log
    the other reads as stale, so every switch between them rebuilt the op (30-45 s of a stage's
    start-up). Torch keys its extension cache by op name alone: two checkouts' venvs on one
    machine (a CI clone beside a working copy) rebuilt it for each other, each with its own
    paths. ``TORCH_EXTENSIONS_DIR`` set by the user is kept."""
    here = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(here, "ninja")) and path.split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + path
    if sys.prefix != sys.base_prefix:  # a virtual environment
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, EXTENSIONS_DIR))


class FetchedAhead:
    """An iterator whose first item is fetched in a thread from the moment it is made.

    A stream's first batch waits on processes starting elsewhere (Ray Data's coordinator and
    read tasks); fetched ahead, that wait overlaps the engine's set-up instead of following it.
    An error in the fetch is raised where the item is asked for."""

    def __init__(self, items: Iterator) -> None:
        self._items = iter(items)
        self._first: list = []
        self._error: BaseException | None = None
        self._fetch = threading.Thread(target=self._fetch_first, daemon=True)
        self._fetch.start()

    def _fetch_first(self) -> None:
        try:
            self._first.append(next(self._items))
        except StopIteration:
            pass
        except BaseException as err:  # raised again in the training thread
            self._error = err

    def __iter__(self) -> Iterator:
        self._fetch.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._items


def _forever(stream, batch_size: int, shuffle_rows: int, seed: int):
    """The planned pass normally covers the budget; should it run dry, start another pass."""
    for n in itertools.count():
        yield from shuffled_batches(stream, batch_size, shuffle_rows, seed * 1_000_003 + n)


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
    held = hold_frozen_pretrained_parts_apart(model)
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
    # Where the engine put (and cast) the module's own parameters, the held parts follow.
    like = next(engine.module.parameters(), None)
    for part in held:
        part.to(device=engine.device, dtype=None if like is None else like.dtype)
    return engine


def hold_frozen_pretrained_parts_apart(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Take the frozen parts that pretrained files supply out of the module tree DeepSpeed wraps;
    the model still reaches them as plain attributes.

    DeepSpeed treats every parameter of the module it is given as training state: ZeRO-3 splits
    each across the ranks and gathers it back for every forward, which for Stable Diffusion's
    2 B frozen parameters is all traffic and no gain, and EMA would shadow them too. Parts with
    a trainable parameter stay in the tree."""
    held: dict[str, torch.nn.Module] = {}
    # Sorted, a part comes before the parts inside it ("classifier", "classifier.model").
    for prefix in sorted(getattr(model, "pretrained_sources", dict)()):
        if any(prefix.startswith(f"{outer}.") for outer in held):
            continue  # goes with its holder
        parent_name, _, name = prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        part = parent._modules.get(name)
        if part is None or any(p.requires_grad for p in part.parameters()):
            continue
        del parent._modules[name]
        object.__setattr__(parent, name, part)  # nn.Module.__setattr__ would register it again
        held[prefix] = part
    return list(held.values())


def _to_device(batch, device, dtype, channels_last: bool = False):
    """The batch on the device; NHWC when asked. Only the activations: a convolution follows its
    input's layout, and DeepSpeed views every parameter's bytes (to broadcast and flatten it),
    which a channels_last weight refuses."""
    lq, gt, task_id = to_model_batch(batch, device=str(device), dtype=dtype)
    if channels_last:
        lq, gt = (t.contiguous(memory_format=torch.channels_last) for t in (lq, gt))
    return lq, gt, task_id


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
            if hasattr(self.model, "configure_sampling"):
                self.model.configure_sampling(steps=self.job.train.eval_sample_steps)
        self.model.load_training_state_dict(weights)
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
        engine.save_checkpoint(
            folder,
            tag=DS_TAG,
            client_state={"step": step},
            exclude_frozen_parameters=_pretrained_parts(engine),
        )
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
    _maybe_inject_failure(job.fault, step, after_checkpoint=True)
    # The controller collects reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s); until it has
    # registered this one, a crash would lose it and a restart would go back one more interval.
    # Wait for that (at most one poll): then a restart repeats at most one checkpoint interval.
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
    )


def consolidated_weights(engine, ema) -> dict[str, torch.Tensor]:
    """The model's training state in full fp32 on every rank (gathered under ZeRO-3): what the
    next stage starts from. Parts that pretrained files supply stay out (the spec names them)."""
    keep = engine.module.training_state_dict().keys()
    if ema is not None:
        return {k: v.detach().float().clone() for k, v in ema.shadow.items() if k in keep}
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(
            list(engine.module.parameters()), modifier_rank=None
        ):
            return _fp32_copy(engine.module.state_dict(), keep)
    return _fp32_copy(engine.module.state_dict(), keep)


def _fp32_copy(state: dict[str, torch.Tensor], keep) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in state.items() if k in keep}


def _restore(engine, ema, checkpoint) -> int:
    """Resume a restarted worker from the stage's last checkpoint; 0 when starting fresh."""
    from allinone.train.deepspeed_files import weights_only_loads

    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder, weights_only_loads(engine):
        strict = not _pretrained_parts(engine)  # the rebuilt model holds its frozen parts
        _, client_state = engine.load_checkpoint(folder, tag=DS_TAG, load_module_strict=strict)
        if ema and (Path(folder) / "ema.pt").is_file():
            ema.load_state_dict(torch.load(Path(folder) / "ema.pt", weights_only=True))
    return int(client_state["step"])


def _pretrained_parts(engine) -> bool:
    """Whether the model loads frozen parts from pretrained files, which its rebuild loads again:
    its DeepSpeed checkpoints then leave frozen parameters out (Stable Diffusion's 2 B)."""
    sources = getattr(engine.module, "pretrained_sources", None)  # any nn.Module trains too
    return bool(sources and sources())


def _all_finite(engine, weights: dict[str, torch.Tensor], with_ema: bool) -> bool:
    """Whether the weights to be saved (and the engine's own, which the DeepSpeed checkpoint
    holds, when EMA's are saved) are all finite, agreed by every rank: a rank that reported
    alone would wait for the others forever."""
    tensors = list(weights.values())
    if with_ema:  # under ZeRO-3 each rank checks its partition; the reduction joins them
        tensors += [p.detach() for p in engine.module.parameters()]
    finite = all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
    flag = torch.tensor([1.0 if finite else 0.0], device=engine.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _record_nonfinite(job: StageJob, step: int, what: str, loss: float) -> None:
    """Leave the verdict (``what`` became non-finite: the loss or the weights) for the driver
    and stop without touching any checkpoint.

    Not raised: Ray Train retries every worker error, and a diverged run fails the same way each
    time. Not reported: a report without a checkpoint never reaches the driver's Result.
    """
    import ray.train

    if ray.train.get_context().get_world_rank() == 0 and job.status_dir:
        verdict = storage.path(job.status_dir) / NONFINITE_FILE
        verdict.parent.mkdir(parents=True, exist_ok=True)
        storage.write_atomic(verdict, json.dumps({"step": step, "what": what, "loss": str(loss)}))


def _maybe_inject_failure(fault: FaultInjection | None, step: int, after_checkpoint: bool) -> None:
    """Test hook: kill this process once, hard, to exercise Ray Train's worker restart: before
    the step after ``fault.at_step``, or right after reporting the step's checkpoint."""
    if fault is None or step != fault.at_step or fault.after_checkpoint != after_checkpoint:
        return
    marker = Path(fault.marker)
    if marker.exists():
        return
    marker.write_text(str(step))
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


@dataclass(frozen=True)
class StepLine:
    """Rank 0's progress line: read by people as printed, and parsed back by the command line's
    progress bars (which see it among everything else the workers print)."""

    stage: str
    step: int
    steps: int
    loss: str  # named for what it is: "train PSNR 24.31 dB", "l1 0.0312"
    lr: float
    rate: float  # samples/s

    PATTERN: ClassVar[re.Pattern] = re.compile(
        r"^\[(?P<stage>[^\]]+)\] step (?P<step>\d+)/(?P<steps>\d+) (?P<loss>.+), "
        r"lr (?P<lr>\S+), (?P<rate>[\d.]+) samples/s$"
    )

    def __str__(self) -> str:
        return (
            f"[{self.stage}] step {self.step}/{self.steps} {self.loss}, lr {self.lr:.1e}, "
            f"{self.rate:.1f} samples/s"
        )

    @classmethod
    def parse(cls, line: str) -> StepLine | None:
        found = cls.PATTERN.match(line.strip())
        if found is None:
            return None
        values = found.groupdict()
        return cls(
            values["stage"],
            int(values["step"]),
            int(values["steps"]),
            values["loss"],
            float(values["lr"]),
            float(values["rate"]),
        )


# Every line rank 0 prints about a stage starts so: the quiet console keeps these, and only these.
STAGE_LINE = re.compile(r"^\[[^\]]+\] step \d+/\d+ ")


def named_loss(parts: dict[str, float], pixel_loss: str) -> str:
    """The training loss as a reader understands it: the psnr pixel loss is minus the batch's
    mean PSNR, so it is shown as that PSNR in dB; the total follows when auxiliary terms add to
    the pixel loss."""
    pixel = parts.get("pixel")
    if pixel is None:  # the model's own objective (a diffusion model's noise prediction)
        return f"loss {parts['total']:.4f}"
    text = f"train PSNR {-pixel:.2f} dB" if pixel_loss == "psnr" else f"{pixel_loss} {pixel:.4f}"
    auxiliary = set(parts) - {"pixel", "total"}
    return f"{text} (total loss {parts['total']:.4f})" if auxiliary else text


class StepLogger:
    """Rank 0's progress line and MLflow metrics (loss, its parts, lr, samples/s).

    A restarted worker (or a resumed driver) trains again the steps after its last checkpoint;
    each step is logged to MLflow once: what a run already holds for a metric is not repeated."""

    def __init__(self, job: StageJob, rank: int) -> None:
        self.job, self.every = job, job.train.log_every
        self.client = None
        if job.tracking_uri and job.mlflow_run_id:
            from mlflow import MlflowClient

            self.client = MlflowClient(job.tracking_uri)
        self.window: list[tuple[float, float]] = []
        self.logged: dict[tuple[str, str], int] = {}  # (run, metric) -> last step it holds

    def log_startup(self, step: int, seconds: float) -> None:
        """``trainer.fit()`` called to this worker's first step done: ``train/startup_s``."""
        if self.client:
            self._to_mlflow(step, {"train/startup_s": seconds})

    def log_resume(self, step: int) -> None:
        """A worker that starts from a checkpoint says so: a line, and ``train/resumed_at``."""
        where = f"[{self.job.stage_name}] step {step}/{self.job.steps}"
        print(f"{where} resumed from its checkpoint", flush=True)
        if self.client:
            self._to_mlflow(step, {"train/resumed_at": float(step)})

    def log(
        self, step: int, parts: dict[str, float], lr: float, samples: int, seconds: float
    ) -> None:
        self.window.append((samples, seconds))
        if step % self.every and step != self.job.steps:
            return
        rate = sum(s for s, _ in self.window) / max(1e-9, sum(t for _, t in self.window))
        self.window.clear()
        loss = named_loss(parts, self.job.train.pixel_loss)
        print(StepLine(self.job.stage_name, step, self.job.steps, loss, lr, rate), flush=True)
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

        run = run_id or self.job.mlflow_run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if step > self._last(run, k)]
        if metrics:
            self.client.log_batch(run, metrics=metrics)
        self.logged.update({(run, m.key): step for m in metrics})

    def _last(self, run: str, key: str) -> int:
        """The last step ``run`` holds for ``key`` (asked once per worker, then remembered)."""
        if (run, key) not in self.logged:
            history = self.client.get_metric_history(run, key)
            self.logged[run, key] = max((m.step for m in history), default=-1)
        return self.logged[run, key]
