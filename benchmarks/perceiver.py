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
predictor's stage is skipped: one task leaves it nothing to tell apart. Reported: PSNR of the
noisy input, of the VAE round trip of the clean image (the ceiling of any latent restorer built
on that VAE), and of the restoration, on RGB after 8-bit rounding.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from allinone import models
from allinone.models.base import pad_to_multiple

DATA = Path(__file__).resolve().parents[2] / "shared/data"
PHOTOS = DATA / "train/CSun_Hays80"
CBSD68 = DATA / "test/CBSD68"
SIGMA = 25 / 255
# Share of the training budget per stage: SD stand-ins first, then MPerceiver's stages.
BUDGET = {"vae": 0.25, "unet prior": 0.2, "diffusion": 0.4, "refinement": 0.15}


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


@torch.no_grad()
def calibrate_latent_scale(net, crops: Crops) -> None:
    """Latents of unit variance, as SD's 0.18215 makes its own (LDM's scale_by_std)."""
    _, gt = crops()
    mean = net.vae.encode(gt * 2 - 1).latent_dist.mean
    net.vae.register_to_config(scaling_factor=float(1 / mean.std()))


def report(stage: str, steps: int, loss: float) -> None:
    print(f"  {stage:10s} {steps:6d} steps, final loss {loss:.4f}", flush=True)


@torch.no_grad()
def evaluate(net, count: int, steps: int) -> None:
    net.eval()
    net.configure_sampling(steps=steps)
    rows = {"input": [], "VAE round trip of the clean image": [], f"perceiver, {steps} steps": []}
    for i, path in enumerate(sorted(CBSD68.glob("*.png"))[:count]):
        clean = load(path)[None].float() / 255
        lq = noisy(clean, torch.Generator().manual_seed(i))
        padded = pad_to_multiple(clean, net.size_multiple)
        latent = net.vae.encode(padded * 2 - 1).latent_dist.mean
        round_trip = ((net.vae.decode(latent).sample + 1) / 2).clamp(0, 1)
        round_trip = round_trip[..., : clean.shape[-2], : clean.shape[-1]]
        for name, image in zip(rows, (lq, round_trip, net(lq)), strict=True):
            rows[name].append(psnr(image, clean))
    print(f"\nCBSD68 sigma 25, {count} images (RGB PSNR, dB)\n| | PSNR |\n|---|---:|")
    for name, values in rows.items():
        print(f"| {name} | {sum(values) / len(values):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-minutes", type=float, default=0.0)
    parser.add_argument("--eval-images", type=int, default=68)
    parser.add_argument("--eval-steps", type=int, default=50)
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
        evaluate(net, args.eval_images, args.eval_steps)


if __name__ == "__main__":
    main()
