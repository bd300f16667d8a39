"""Scoring a model on a task's test shards: PSNR and SSIM on full-size images, RGB and Y.

Full images are restored in overlapping tiles when ``tile`` is set, so memory stays bounded
whatever their size. The model is used blind (no task id): the all-in-one setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from allinone.images import decode_image_bytes
from allinone.metrics import psnr, restore_tiled, ssim, to_image, to_tensor
from allinone.shards import iter_tar_samples, shard_urls


@dataclass(frozen=True)
class TaskScore:
    task: str
    images: int
    psnr: float
    ssim: float
    psnr_y: float
    ssim_y: float
    input_psnr: float  # the degraded input against its ground truth: the bar to clear

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{k}": v for k, v in vars(self).items() if isinstance(v, float)}


def test_pairs(folder: Path, task: str, limit: int | None = None):
    """Decoded (key, lq, gt) test pairs of a built task split."""
    count = 0
    for url in shard_urls(folder, task, "test"):
        for key, members in iter_tar_samples(Path(url)):
            if limit is not None and count >= limit:
                return
            count += 1
            yield (
                key,
                decode_image_bytes(members["lq.png"], f"{url}:{key}"),
                decode_image_bytes(members["gt.png"], f"{url}:{key}"),
            )


@torch.no_grad()
def score_task(
    model: torch.nn.Module,
    folder: Path,
    task: str,
    limit: int | None = None,
    tile: int | None = None,
    crop_border: int = 0,
) -> TaskScore:
    model.eval()
    rows = []
    for _, lq, gt in test_pairs(folder, task, limit):
        restored = to_image(restore_tiled(model, to_tensor(lq), tile))
        rows.append(
            (
                psnr(restored, gt, crop_border=crop_border),
                ssim(restored, gt, crop_border=crop_border),
                psnr(restored, gt, crop_border=crop_border, y_channel=True),
                ssim(restored, gt, crop_border=crop_border, y_channel=True),
                psnr(lq, gt, crop_border=crop_border),
            )
        )
    if not rows:
        raise ValueError(f"{folder}: no test samples for task {task}")
    means = np.mean(np.array(rows, dtype=np.float64), axis=0)
    return TaskScore(task, len(rows), *(float(v) for v in means))
