"""Training objective: a pixel loss plus weighted auxiliary terms, the same for every model.

``total = pixel(restored, target) + sum(weight[name] * aux[name])`` where the aux terms are the
model's own (``Restoration.aux``: regularisers, and supervised terms such as a frequency loss or a
diffusion model's noise prediction, which comes without an image and so without a pixel loss)
and, when the model predicts the degradation and the task is known, a focal loss on its logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from allinone.models.base import Restoration


def l1(pred: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(pred, target)


def charbonnier(pred: Tensor, target: Tensor, eps: float = 1e-3) -> Tensor:
    # A smooth L1: differentiable at zero, so small residuals keep a useful gradient.
    return torch.sqrt((pred - target) ** 2 + eps**2).mean()


def psnr_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Minus the mean PSNR of the batch's images (HINet's PSNR loss), up to a constant.

    Per image, so every image counts by its relative error: under L1, hazy images (errors of
    0.1-0.2) outweighed rainy ones (0.01) tenfold and an all-in-one model learned haze first and
    harmed the rest; in log space a dB is a dB whatever the task (benchmarks/quality.py)."""
    mse = (pred.float() - target.float()).square().mean(dim=tuple(range(1, pred.dim())))
    return 10 * torch.log10(mse + eps).mean()


PIXEL_LOSSES = {"l1": l1, "charbonnier": charbonnier, "psnr": psnr_loss}


def focal(logits: Tensor, labels: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al.): cross-entropy scaled down on classes already predicted well."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    log_p_true = log_probs.gather(1, labels[:, None]).squeeze(1)
    return (-((1 - log_p_true.exp()) ** gamma) * log_p_true).mean()


def total_loss(
    out: Restoration,
    target: Tensor,
    task_id: Tensor | None,
    pixel: str = "l1",
    aux_weights: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The scalar to backpropagate and a dict of its named parts for logging."""
    weights = dict(aux_weights or {})
    loss = target.new_zeros(())
    parts = {}
    if out.image is not None:  # None: the model's own objective (in aux) replaces a pixel loss
        loss = PIXEL_LOSSES[pixel](out.image.float(), target)
        parts["pixel"] = float(loss.detach())
    terms = dict(out.aux)
    if out.logits is not None and task_id is not None:
        terms["focal"] = focal(out.logits, task_id)
    for name, value in terms.items():
        weight = weights.get(name, 1.0)
        parts[name] = float(value.detach())
        if weight:
            loss = loss + weight * value
    return loss, parts
