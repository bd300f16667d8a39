"""MPerceiver (``perceiver``, tiny preset): what diffusion costs, and what a few minutes buy.

    .venv/bin/python benchmarks/perceiver.py                     # timing only
    .venv/bin/python benchmarks/perceiver.py --train-minutes 10  # + train, then CBSD68 sigma 25

Timing: training ms per step (diffusion stage, noise prediction) and restoration seconds per
CBSD68 image for 1, 10 and 50 DDIM steps, as ratios to the 1-step restoration.

Training (bare PyTorch, no Ray) on random crops of the clean photos with Gaussian noise sigma 25.
The tiny preset has no pretrained Stable Diffusion, so the budget first trains its stand-ins, as
SD was trained before MPerceiver: the VAE (L1 reconstruction) and the UNet (noise prediction on
clean latents, empty context); then MPerceiver's own stages with those frozen: the diffusion
stage (prompts, IR adapter, SPADE) and the refinement stage (decoder fusion, L1). The degradation
predictor's stage is skipped: one task leaves it nothing to tell apart. Then, for the same
minutes as MPerceiver's two stages, the one-step regressor the ``perceiver`` model used to be
(rebuilt here on the same stand-ins: the degraded image's mean latent plus one pass of a fully
trainable UNet at t = 999 with learned context tokens, decoded, trained on L1; no focal loss,
one task has no classes to weigh). Reported: PSNR of the noisy input, of the VAE round trip of
the clean image (the ceiling of any latent restorer built on that VAE), of the regressor and of
the restoration, on RGB after 8-bit rounding; then tiling: the restoration whole and in 128 px
tiles (32 px blended overlap), with the gradient energy inside the blend bands against the rest
of the image, as a ratio to the whole image's (1.00: no seam).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from _common import machine_use_reported
from allinone import models
from allinone.evaluate.metrics import default_overlap, restore_tiled, tile_starts
from allinone.models.base import pad_to_multiple

DATA = Path(__file__).resolve().parents[2] / "shared/data"
PHOTOS = DATA / "train/CSun_Hays80"
CBSD68 = DATA / "test/CBSD68"
SIGMA = 25 / 255
# Share of the training budget per stage: SD stand-ins first, then MPerceiver's stages.
BUDGET = {"vae": 0.25, "unet prior": 0.2, "diffusion": 0.4, "refinement": 0.15}
TILE = 128


def load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def noisy(clean: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(clean.shape, generator=generator) * SIGMA
    return (clean + noise).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = (a * 255).round() / 255, (b * 255).round() / 255
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


class Crops:
    """Random clean crops of the training photos, and their noisy versions."""

    def __init__(self, size: int, batch: int, seed: int = 0) -> None:
        self.photos = [load(p) for p in sorted(PHOTOS.glob("*.jpg"))]
        self.size, self.batch = size, batch
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(len(self.photos), (self.batch,), generator=self.generator)
        out = []
        for i in picks.tolist():
            photo = self.photos[i]
            top = int(torch.randint(photo.shape[1] - self.size + 1, (1,), generator=self.generator))
            left = int(
                torch.randint(photo.shape[2] - self.size + 1, (1,), generator=self.generator)
            )
            out.append(photo[:, top : top + self.size, left : left + self.size])
        clean = torch.stack(out).float() / 255
        return noisy(clean, self.generator), clean


def model(seed: int = 0) -> models.RestorationModel:
    torch.manual_seed(seed)
    built = models.build("perceiver", "tiny", task_names=("denoise",))
    built.seed_training(seed)
    return built


# -- timing -----------------------------------------------------------------------------------


def timing(crops: Crops, steps: tuple[int, ...] = (1, 10, 50)) -> None:
    net = model().train()
    optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=1e-4)
    task = torch.zeros(crops.batch, dtype=torch.long)

    def train_step() -> None:
        lq, gt = crops()
        net(lq, task, with_aux=True, target=gt).aux["noise"].backward()
        optimizer.step()
        optimizer.zero_grad()

    train_ms = 1000 * median_seconds(train_step, warmup=2, repeats=5)
    net.eval()
    image = load(sorted(CBSD68.glob("*.png"))[0])[None].float() / 255
    image = noisy(image, torch.Generator().manual_seed(0))
    net.configure_sampling(steps=steps[0])
    net(image)  # the first pass at a new size pays one-off kernel set-up
    restore = {}
    for count in steps:
        net.configure_sampling(steps=count)
        restore[count] = median_seconds(lambda: net(image), warmup=0, repeats=1)
    base = restore[steps[0]]
    print(
        f"\ntiny perceiver, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| measure | time | ratio to 1-step restore |\n|---|---:|---:|")
    print(
        f"| train step ({crops.batch} x {crops.size}^2 crops) | {train_ms:.0f} ms | "
        f"{train_ms / 1000 / base:.2f}x |"
    )
    for count, seconds in restore.items():
        print(
            f"| restore {tuple(image.shape[-2:])}, {count} DDIM steps | {seconds:.2f} s | "
            f"{seconds / base:.2f}x |"
        )


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- training -----------------------------------------------------------------------------------


def run_for(seconds: float, step: Callable[[], float]) -> tuple[int, float]:
    """Steps taken in ``seconds`` and the mean loss of the last quarter of them."""
    losses, end = [], time.monotonic() + seconds
    while time.monotonic() < end or not losses:
        losses.append(step())
    tail = losses[-max(1, len(losses) // 4) :]
    return len(losses), sum(tail) / len(tail)


def optimise(params, lr: float, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(list(params), lr=lr)

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    return step


def train(net, crops: Crops, minutes: float) -> None:
    budget = {name: share * minutes * 60 for name, share in BUDGET.items()}
    vae, unet = net.vae, net.unet
    task = torch.zeros(crops.batch, dtype=torch.long)

    def vae_loss() -> torch.Tensor:
        _, gt = crops()
        posterior = vae.encode(gt * 2 - 1).latent_dist
        recon = vae.decode(posterior.sample()).sample
        return F.l1_loss(recon, gt * 2 - 1) + 1e-6 * posterior.kl().mean()

    def prior_loss() -> torch.Tensor:
        _, gt = crops()
        latent, _ = net.encode(gt, None)
        t = torch.randint(0, 1000, (len(gt),))
        noise = torch.randn_like(latent)
        context = torch.zeros(
            len(gt), net.cond_stage_model.model.context_length, net.cond_stage_model.width
        )
        noisy_latent = net.noise_scheduler.add_noise(latent, noise, t)
        return F.mse_loss(unet(noisy_latent, t, encoder_hidden_states=context).sample, noise)

    def diffusion_loss() -> torch.Tensor:
        lq, gt = crops()
        return net(lq, task, with_aux=True, target=gt).aux["noise"]

    def refinement_loss() -> torch.Tensor:
        lq, gt = crops()
        return F.l1_loss(net(lq, task, with_aux=True, target=gt).image, gt)

    net.train()
    vae.requires_grad_(True)
    report("vae", *run_for(budget["vae"], optimise(vae.parameters(), 1e-3, vae_loss)))
    calibrate_latent_scale(net, crops)
    vae.requires_grad_(False)
    unet.requires_grad_(True)
    report(
        "unet prior", *run_for(budget["unet prior"], optimise(unet.parameters(), 5e-4, prior_loss))
    )
    net.set_training_stage("diffusion")  # freezes the stand-ins again
    steps = optimise(net.trainable_parameters(), 5e-4, diffusion_loss)
    report("diffusion", *run_for(budget["diffusion"], steps))
    net.set_training_stage("refinement")
    net.refinement_sample_steps = 10
    steps = optimise(net.trainable_parameters(), 5e-4, refinement_loss)
    report("refinement", *run_for(budget["refinement"], steps))


class OneStepRegressor(nn.Module):
    """What ``perceiver`` was before it was a diffusion model: the degraded image's mean latent
    plus one UNet pass at t = 999, decoded. Its own copy of the UNet trains whole, with learned
    context tokens in place of the prompts; the VAE is the diffusion model's, frozen."""

    def __init__(self, net) -> None:
        super().__init__()
        self.vae = net.vae  # shared and frozen: both restorers decode through the same VAE
        self.unet = copy.deepcopy(net.unet).requires_grad_(True)
        tokens, width = net.cond_stage_model.model.context_length, net.cond_stage_model.width
        self.context = nn.Parameter(0.02 * torch.randn(1, tokens, width))
        self.size_multiple = net.size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, self.size_multiple)
        with torch.no_grad():
            latent = self.vae.encode(padded * 2 - 1).latent_dist.mean
        scale = self.vae.config.scaling_factor
        t = torch.full((len(x),), 999)
        context = self.context.expand(len(x), -1, -1)
        latent = latent + self.unet(latent * scale, t, encoder_hidden_states=context).sample / scale
        image = (self.vae.decode(latent).sample + 1) / 2
        return image[..., :height, :width].clamp(0, 1)


def train_regressor(net, crops: Crops, minutes: float) -> OneStepRegressor:
    regressor = OneStepRegressor(net).train()

    def l1_loss() -> torch.Tensor:
        lq, gt = crops()
        return F.l1_loss(regressor(lq), gt)

    seconds = (BUDGET["diffusion"] + BUDGET["refinement"]) * minutes * 60
    params = [p for p in regressor.parameters() if p.requires_grad]
    report("regressor", *run_for(seconds, optimise(params, 5e-4, l1_loss)))
    return regressor.eval()


@torch.no_grad()
def calibrate_latent_scale(net, crops: Crops) -> None:
    """Latents of unit variance, as SD's 0.18215 makes its own (LDM's scale_by_std)."""
    _, gt = crops()
    mean = net.vae.encode(gt * 2 - 1).latent_dist.mean
    net.vae.register_to_config(scaling_factor=float(1 / mean.std()))


def report(stage: str, steps: int, loss: float) -> None:
    print(f"  {stage:10s} {steps:6d} steps, final loss {loss:.4f}", flush=True)


@torch.no_grad()
def evaluate(net, regressor: OneStepRegressor, count: int, steps: int) -> None:
    net.eval()
    net.configure_sampling(steps=steps)
    rows = {
        "input": [],
        "VAE round trip of the clean image": [],
        "one-step regressor": [],
        f"perceiver, {steps} steps": [],
    }
    for i, path in enumerate(sorted(CBSD68.glob("*.png"))[:count]):
        clean = load(path)[None].float() / 255
        lq = noisy(clean, torch.Generator().manual_seed(i))
        padded = pad_to_multiple(clean, net.size_multiple)
        latent = net.vae.encode(padded * 2 - 1).latent_dist.mean
        round_trip = ((net.vae.decode(latent).sample + 1) / 2).clamp(0, 1)
        round_trip = round_trip[..., : clean.shape[-2], : clean.shape[-1]]
        for name, image in zip(rows, (lq, round_trip, regressor(lq), net(lq)), strict=True):
            rows[name].append(psnr(image, clean))
    print(f"\nCBSD68 sigma 25, {count} images (RGB PSNR, dB)\n| | PSNR |\n|---|---:|")
    for name, values in rows.items():
        print(f"| {name} | {sum(values) / len(values):.2f} |")


@torch.no_grad()
def seams(net, count: int, steps: int) -> None:
    """Whole against tiled restoration, and the tiled image's gradient energy in its blend
    bands (pixels two tiles cover) over the rest, divided by the same ratio of the whole one."""
    net.configure_sampling(steps=steps)
    overlap = default_overlap(TILE)
    whole_psnr, tiled_psnr, ratios = [], [], []
    for i, path in enumerate(sorted(CBSD68.glob("*.png"))[:count]):
        clean = load(path)[None].float() / 255
        lq = noisy(clean, torch.Generator().manual_seed(i))
        whole, tiled = net(lq), restore_tiled(net, lq, tile=TILE, overlap=overlap)
        whole_psnr.append(psnr(whole, clean))
        tiled_psnr.append(psnr(tiled, clean))
        bands = blend_bands(lq, TILE, overlap)
        ratios.append(band_energy(tiled, bands) / band_energy(whole, bands))
    print(
        f"\ntiles of {TILE} px, {overlap} px overlap, {steps} steps, {count} images\n"
        "| | PSNR | band / rest gradient, tiled over whole |\n|---|---:|---:|\n"
        f"| whole | {statistics.mean(whole_psnr):.2f} | |\n"
        f"| tiled | {statistics.mean(tiled_psnr):.2f} | {statistics.mean(ratios):.3f} |"
    )


def blend_bands(image: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """(H, W) mask of the pixels that two or more tiles cover."""
    height, width = image.shape[-2:]
    cover = torch.zeros(height, width)
    for top in tile_starts(height, min(tile, height), tile - overlap):
        for left in tile_starts(width, min(tile, width), tile - overlap):
            cover[top : top + tile, left : left + tile] += 1
    return cover > 1


def band_energy(image: torch.Tensor, bands: torch.Tensor) -> float:
    """Mean absolute gradient inside the bands over the mean outside them."""
    gray = image.mean(dim=1)[0]
    grad = torch.zeros_like(gray)
    grad[:, 1:] += (gray[:, 1:] - gray[:, :-1]).abs()
    grad[1:, :] += (gray[1:, :] - gray[:-1, :]).abs()
    return float(grad[bands].mean() / grad[~bands].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-minutes", type=float, default=0.0)
    parser.add_argument("--eval-images", type=int, default=68)
    parser.add_argument("--eval-steps", type=int, default=50)
    parser.add_argument("--seam-images", type=int, default=4)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    crops = Crops(args.crop, args.batch)
    if not args.skip_timing:
        timing(crops)
    if args.train_minutes > 0:
        print(f"\ntraining {args.train_minutes} minutes (load average {os.getloadavg()[0]:.1f})")
        net = model()
        train(net, crops, args.train_minutes)
        regressor = train_regressor(net, crops, args.train_minutes)
        evaluate(net, regressor, args.eval_images, args.eval_steps)
        seams(net, args.seam_images, args.eval_steps)


if __name__ == "__main__":
    with machine_use_reported():
        main()
