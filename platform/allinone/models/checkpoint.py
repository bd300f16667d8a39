"""Our own checkpoint file: the weights and the card that says what they are, in one file that
loads without running code.

A checkpoint is ``torch.save({"format": FORMAT, "card": {...}, "state_dict": {...}})``: plain
containers, strings, numbers and tensors only, so ``torch.load(..., weights_only=True)`` reads it
and a crafted pickle is refused instead of executed. The card holds the :class:`ModelSpec` and
where the weights came from (a run, an imported release), so a bare file rebuilds its network.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from allinone.models.spec import ModelSpec

FORMAT = "allinone.checkpoint/1"


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of ours; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    spec: ModelSpec
    state_dict: dict[str, Tensor]
    # Where the weights came from, for model cards: e.g. {"imported_from": "model.ckpt",
    # "repository": "va1shn9v/PromptIR"} or {"run_id": ..., "stage": ...}.
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        model = self.spec.build()
        model.load_training_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write atomically: a reader sees the old file or the whole new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "card": {"model": checkpoint.spec.to_json(), "provenance": dict(checkpoint.provenance)},
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in checkpoint.state_dict.items()},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_checkpoint(payload: object) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def is_checkpoint_file(path: str | Path) -> bool:
    """Whether ``path`` holds one of our checkpoints (a card and weights), read tensors-only."""
    try:
        return is_checkpoint(torch.load(path, map_location="meta", weights_only=True))
    except Exception:  # not a torch file, or one weights_only refuses: not ours either way
        return False


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as error:  # an unpickling refusal, a truncated file, not a torch file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first})") from None
    if not is_checkpoint(payload):
        raise CheckpointError(f"{path}: not an allinone checkpoint (no {FORMAT!r} card)")
    try:
        spec = ModelSpec.from_json(payload["card"]["model"])
        provenance = dict(payload["card"].get("provenance") or {})
        state = dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: malformed checkpoint card ({error})") from None
    return Checkpoint(spec, state, provenance)
