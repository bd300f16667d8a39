"""``allinone restore``: a trained model applied to a user's own images, of any size and kind.

Every input is planned before any work starts: folders are listed (recursively, keeping their
sub-folders in the output), each output name is fixed as ``<stem>.png``, and a plan that would
overwrite an existing file without ``--overwrite`` (or write two inputs to one name) is refused
whole. Grey, RGBA and 16-bit inputs are read through :func:`allinone.data.images.read_image`; a grey
input comes back grey, a transparent one with its alpha (its colour is restored, the alpha put
back as it was). Outputs are written atomically; an unreadable file, or one over the pixel limit,
is reported by name and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from allinone.config import DEFAULT_MAX_PIXELS
from allinone.data.images import ImageReadError, is_image_file, read_image, write_image_atomic
from allinone.evaluate.metrics import restore_tiled, to_image, to_tensor
from allinone.tracking.resolve import ResolvedModel

AUTO = "auto"


class RestoreError(ValueError):
    """Inputs or outputs that make the whole request impossible; the message names the path."""


@dataclass(frozen=True)
class RestoreJob:
    pairs: tuple[tuple[Path, Path], ...]  # (input file, output file)
    task: str | None  # None: blind, the model decides
    tile: int | None
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger inputs are refused before decoding

    @classmethod
    def plan(
        cls,
        inputs: list[Path],
        out: Path,
        task: str,
        tile: int | None,
        overwrite: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> RestoreJob:
        pairs = tuple((src, out / relative) for src, relative in _listed(inputs, out))
        _check_outputs(pairs, overwrite)
        return cls(pairs, None if task == AUTO else task, tile, max_pixels)


def _listed(inputs: list[Path], out: Path) -> list[tuple[Path, Path]]:
    """(input file, output path relative to ``out``) for every file and every folder's images."""
    listed = []
    for given in inputs:
        if given.is_dir():
            found = [
                p
                for p in sorted(given.rglob("*"))
                if p.is_file()
                and is_image_file(p)
                and not p.resolve().is_relative_to(out.resolve())
            ]
            if not found:
                raise RestoreError(f"{given}: no image files in this folder")
            listed += [(p, p.relative_to(given).with_suffix(".png")) for p in found]
        elif given.is_file():
            listed.append((given, Path(given.name).with_suffix(".png")))
        else:
            raise RestoreError(f"{given}: no such file or folder")
    return listed


def _check_outputs(pairs: tuple[tuple[Path, Path], ...], overwrite: bool) -> None:
    seen: dict[Path, Path] = {}
    for src, dst in pairs:
        if dst in seen:
            raise RestoreError(f"{src} and {seen[dst]} would both be written to {dst}")
        seen[dst] = src
        if src.resolve() == dst.resolve():
            raise RestoreError(f"{src}: the output would replace the input; choose another --out")
        if dst.exists() and not overwrite:
            raise RestoreError(f"{dst} exists; pass --overwrite to replace it (nothing written)")


@dataclass
class RestoreReport:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def restore_images(resolved: ResolvedModel, job: RestoreJob, console=None) -> RestoreReport:
    """Restore every planned file, with a progress bar on ``console`` when given."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    task_id = _task_id(resolved, job.task)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = resolved.module.to(device).eval()
    report = RestoreReport()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeRemainingColumn(), console=console, disable=console is None) as bar:
        progress = bar.add_task("restoring", total=len(job.pairs))
        for src, dst in job.pairs:
            bar.update(progress, description=f"restoring {src.name}")
            try:
                restored = _restore_file(model, src, task_id, job, device)
                write_image_atomic(restored, dst)
                report.written.append(dst)
            except ImageReadError as err:
                report.failed.append((src, str(err).removeprefix(f"{src}: ")))
            bar.advance(progress)
    return report


def _task_id(resolved: ResolvedModel, task: str | None) -> torch.Tensor | None:
    if task is None:
        return None
    if task not in resolved.task_names:
        raise RestoreError(
            f"--task {task}: not a task of this model (trained on {', '.join(resolved.task_names)})"
        )
    return torch.tensor([resolved.task_names.index(task)])


def _restore_file(
    model: torch.nn.Module, src: Path, task_id: torch.Tensor | None, job: RestoreJob, device: str
) -> np.ndarray:
    """The restored pixels as the input had them: grey or colour, with its alpha if any."""
    loaded = read_image(src, job.max_pixels, flatten=False)
    task_id = task_id.to(device) if task_id is not None else None
    batch = to_tensor(loaded.pixels).to(device)
    restored = to_image(restore_tiled(model, batch, job.tile, task_id=task_id))
    if "grey->rgb" in loaded.conversions:
        restored = restored.mean(axis=2, keepdims=True)  # grey in, grey out
    if loaded.alpha is not None:
        restored = np.concatenate([restored, loaded.alpha[..., None]], axis=2)
    return restored[..., 0] if restored.shape[2] == 1 else restored
