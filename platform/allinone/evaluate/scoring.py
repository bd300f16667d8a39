"""Scoring restorations: PSNR and SSIM on full-size images, RGB and Y, for models and baselines.

One function, :func:`score_pairs`, scores any restorer (a network, a classical baseline, the
identity) on any (key, degraded, ground truth) pairs, so every number in a results table comes
from the same code on the same images. Full images are restored in overlapping tiles when
``tile`` is set, so memory stays bounded whatever their size. Networks are used blind (no task
id): the all-in-one setting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from allinone.data import storage
from allinone.data.members import decode_pair_float
from allinone.data.shards import iter_tar_samples, shard_urls
from allinone.data.storage import StoragePath
from allinone.evaluate.metrics import psnr, restore_tiled, ssim, to_image, to_tensor

Pair = tuple[str, np.ndarray, np.ndarray]  # (key, degraded, ground truth), float HxWx3 in [0, 1]
Restorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Quality:
    """Mean scores over a set of images."""

    images: int
    psnr: float
    ssim: float
    psnr_y: float
    ssim_y: float
    input_psnr: float  # the degraded input against its ground truth: the bar to clear
    # Wall seconds per image of the restorer (a diffusion model's whole sampling run).
    seconds: float


@dataclass(frozen=True)
class Sample:
    """One restored image with its input and target, for a picture of what the numbers mean."""

    key: str
    degraded: np.ndarray
    restored: np.ndarray
    target: np.ndarray
    psnr: float
    input_psnr: float


@dataclass(frozen=True)
class TestSplit:
    """A task's built test shards, scored as part of a suite during and after training."""

    __test__ = False  # not a pytest class, for all its name

    suite: str  # all-in-one or zero-shot
    task: str
    folder: StoragePath  # on local disk or in object storage (``data.shards``)
    crop_border: int = 0  # pixels each border leaves out of the scores (SR: its scale)


@dataclass(frozen=True)
class TaskScore:
    task: str
    images: int
    psnr: float
    ssim: float
    psnr_y: float
    ssim_y: float
    input_psnr: float
    seconds: float

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{k}": v for k, v in vars(self).items() if isinstance(v, float)}


def model_restorer(
    model: torch.nn.Module, tile: int | None = None, task: str | None = None
) -> Restorer:
    """A network as a restorer of float images, tiled when an image exceeds ``tile``.

    Blind (the all-in-one setting), unless the network cannot restore without its task
    (``needs_task``): then it is told ``task``, the test set's own."""
    model.eval()
    device = next(model.parameters()).device
    task_id = told_task(model, task)

    def restore(lq: np.ndarray) -> np.ndarray:
        x = to_tensor(lq).to(device)
        return to_image(restore_tiled(model, x, tile, task_id=task_id))

    return restore


def told_task(model: torch.nn.Module, task: str | None) -> torch.Tensor | None:
    """The task id to pass a network that needs one; None for a blind network."""
    if not getattr(model, "needs_task", False):
        return None
    names = tuple(getattr(model, "task_names", ()))
    if task not in names:
        raise ValueError(
            f"{type(model).__name__} restores only when told its task, and {task!r} is not "
            f"one of its tasks ({', '.join(names)})"
        )
    return torch.tensor([names.index(task)])


def score_pairs(
    restore: Restorer, pairs: Iterable[Pair], crop_border: int = 0, origin: str = "test pairs"
) -> tuple[Quality, Sample]:
    """Mean quality of ``restore`` over ``pairs`` and the first pair as a sample."""
    rows, sample = [], None
    for key, lq, gt in pairs:
        started = time.perf_counter()
        restored = restore(lq)
        seconds = time.perf_counter() - started
        row = (
            psnr(restored, gt, crop_border=crop_border),
            ssim(restored, gt, crop_border=crop_border),
            psnr(restored, gt, crop_border=crop_border, y_channel=True),
            ssim(restored, gt, crop_border=crop_border, y_channel=True),
            psnr(lq, gt, crop_border=crop_border),
            seconds,
        )
        rows.append(row)
        if sample is None:
            sample = Sample(key, lq, restored, gt, row[0], row[4])
    if sample is None:
        raise ValueError(f"{origin}: no images to score")
    means = np.mean(np.array(rows, dtype=np.float64), axis=0)
    return Quality(len(rows), *(float(v) for v in means)), sample


def test_pairs(folder: StoragePath, task: str, limit: int | None = None) -> Iterator[Pair]:
    """Decoded (key, lq, gt) test pairs of a built task split."""
    count = 0
    for url in shard_urls(folder, task, "test"):
        for key, members in iter_tar_samples(storage.path(url)):
            if limit is not None and count >= limit:
                return
            count += 1
            yield (key, *decode_pair_float(members, f"{url}:{key}"))


@torch.no_grad()
def score_task_with_sample(
    model: torch.nn.Module,
    folder: StoragePath,
    task: str,
    limit: int | None = None,
    tile: int | None = None,
    crop_border: int = 0,
) -> tuple[TaskScore, Sample]:
    """A model on a task's built test shards, with the first test image restored."""
    pairs = test_pairs(folder, task, limit)
    quality, sample = score_pairs(
        model_restorer(model, tile, task), pairs, crop_border, f"{folder}: task {task}"
    )
    return TaskScore(task, **vars(quality)), sample


def score_task(
    model: torch.nn.Module,
    folder: StoragePath,
    task: str,
    limit: int | None = None,
    tile: int | None = None,
    crop_border: int = 0,
) -> TaskScore:
    return score_task_with_sample(model, folder, task, limit, tile, crop_border)[0]


# --------------------------------------------------------------------------- validation
@torch.no_grad()
def validation_metrics(
    model: torch.nn.Module,
    splits: Iterable[TestSplit],
    limit: int | None = None,
    tile: int | None = None,
) -> dict[str, float]:
    """PSNR and SSIM per task and their means per suite, on built test splits: the scores a run
    follows during training (names as :func:`allinone.config.validation_metric_names`)."""
    by_suite: dict[str, list[TaskScore]] = {}
    for split in splits:
        score = score_task(model, split.folder, split.task, limit, tile, split.crop_border)
        by_suite.setdefault(split.suite, []).append(score)
    metrics: dict[str, float] = {}
    for suite, scores in by_suite.items():
        for score in scores:
            metrics[f"{suite}/{score.task}/psnr"] = score.psnr
            metrics[f"{suite}/{score.task}/ssim"] = score.ssim
        metrics[f"{suite}/average_psnr"] = float(np.mean([s.psnr for s in scores]))
        metrics[f"{suite}/average_ssim"] = float(np.mean([s.ssim for s in scores]))
    return metrics
