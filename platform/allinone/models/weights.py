"""Loading weights a user hands us as a local file, with errors that name the file and the problem.

Nothing is ever downloaded: a model starts from random init and takes pretrained weights only from
a path. torch's own ``load_state_dict`` error is a wall of key names without the file it came from;
here every failure says which file, what it was meant to hold, and the first few offending keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

# How many offending keys an error lists before it only counts the rest.
_SHOWN = 5


def read_state_file(path: str | Path, what: str) -> dict[str, Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch pickle (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # weights_only: a checkpoint from elsewhere must not run code when unpickled.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{what} weights file {path} could not be read: {error}") from error
    return _as_state_dict(state, path, what)


def _as_state_dict(state: object, path: Path, what: str) -> dict[str, Tensor]:
    # Training checkpoints (open_clip's among them) wrap the weights as {"state_dict": ...}.
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{what} weights file {path} does not hold a state dict of tensors "
            f"(found {type(state).__name__})"
        )
    # Weights saved from a DistributedDataParallel wrapper carry its "module." prefix on every key.
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_state_file(module: nn.Module, path: str | Path, what: str) -> None:
    """Load a local state dict into ``module`` strictly, or raise naming the path and the keys."""
    state = read_state_file(path, what)
    problems = state_dict_mismatch(module, state)
    if problems:
        raise ValueError(f"{what} weights file {path} does not fit the model: {problems}")
    module.load_state_dict(state, strict=not hasattr(module, "training_state_dict"))


def state_dict_mismatch(module: nn.Module, state: dict[str, Tensor]) -> str:
    """Describe missing, unexpected and wrongly shaped keys; empty when the state dict fits.
    A model's parts that its pretrained files supply may be absent (its training state)."""
    expected = module.state_dict()
    needed = module.training_state_dict() if hasattr(module, "training_state_dict") else expected
    missing = [k for k in needed if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = [
        _listing(label, keys)
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file vs model)", reshaped),
        )
        if keys
    ]
    return "; ".join(parts)


def _listing(label: str, items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{len(items)} {label}: {', '.join(items[:_SHOWN])}{more}"
