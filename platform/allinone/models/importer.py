"""Turning an official released checkpoint into one of ours, strictly.

Authors ship their weights in a handful of layouts: a Lightning checkpoint
(``{"state_dict": {"net.<key>": ...}, "optimizer_states": ...}``), a BasicSR file
(``{"params": ...}`` and/or ``{"params_ema": ...}``), a plain state dict, any of them with the
``module.`` prefix of a data-parallel wrapper, or a ``.safetensors`` file. :func:`import_official`
finds the weights in any of these, applies the architecture's :class:`OfficialRelease` (drop the
tensors its forward never uses, by name; rename), and accepts them only if they are exactly the
network of the preset: every tensor mapped, every shape equal. Anything else is refused with one
line naming the file and the first offending keys. Reading never runs code from the file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from allinone.models.base import MODELS, ModelEntry, OfficialRelease
from allinone.models.checkpoint import Checkpoint
from allinone.models.spec import ModelSpec
from allinone.models.weights import state_dict_mismatch

# Prefixes a training wrapper puts before every key: DistributedDataParallel's, and the attribute
# PromptIR's and AdaIR's LightningModules keep their network in.
WRAPPER_PREFIXES = ("module.", "net.")
# BasicSR keys, most preferred first. BasicSR loads "params" unless a test option names
# "params_ema", and MiOIR's test options name none (its test() also runs net_g, not the EMA copy):
# the published numbers come from "params" where a file holds both.
BASICSR_KEYS = ("params", "params_ema")


class CheckpointImportError(ValueError):
    """A released checkpoint that cannot be imported; the one-line message names the file."""


def import_official(
    arch: str,
    path: str | Path,
    preset: str | None = None,
    extra: Mapping[str, Tensor] | None = None,
) -> Checkpoint:
    """Our checkpoint of ``arch`` at ``preset`` (default: the preset of its official release)
    from the authors' released file at ``path``.

    ``extra`` adds tensors the release keeps outside its checkpoint (MiOIR's explicit prompt
    maps), under our key names.
    """
    release = _release(arch)
    preset = preset or release.preset
    path = Path(path)
    state, layout = find_weights(_read(path), path)
    state = official_state_dict(arch, state, preset, extra, source=str(path))
    provenance = {
        "imported_from": path.name,
        "sha256": _sha256(path),
        "layout": layout,
        "repository": release.repository,
        "arch": arch,
        "preset": preset,
    }
    if extra:
        provenance["extra"] = sorted(extra)
    return Checkpoint(ModelSpec(arch, preset), state, provenance)


def official_state_dict(
    arch: str,
    state: Mapping[str, Tensor],
    preset: str | None = None,
    extra: Mapping[str, Tensor] | None = None,
    source: str = "checkpoint",
) -> dict[str, Tensor]:
    """Map an official state dict (wrapper prefixes allowed) to our keys and check it strictly
    against ``arch`` at ``preset``; raise :class:`CheckpointImportError` naming ``source``."""
    release = _release(arch)
    preset = preset or release.preset
    mapped = _our_keys(strip_wrappers(state), release)
    for key, tensor in (extra or {}).items():
        if key in mapped:
            raise CheckpointImportError(f"{source}: extra tensor {key} is already in the file")
        mapped[key] = tensor
    problems = state_dict_mismatch(_skeleton(arch, preset), mapped)
    if problems:
        raise CheckpointImportError(f"{source}: not the official {arch} ({preset}): {problems}")
    return mapped


def find_weights(payload: object, path: Path) -> tuple[dict[str, Tensor], str]:
    """The state dict inside a loaded file, and the name of the layout it came in."""
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        state, layout = payload["state_dict"], "lightning"
    elif isinstance(payload, Mapping) and (key := _basicsr_key(payload)):
        state, layout = payload[key], f"basicsr {key}"
    elif _is_state_dict(payload):
        return dict(payload), "state dict"
    else:
        raise CheckpointImportError(f"{path}: holds no state dict (found {_describe(payload)})")
    if not _is_state_dict(state):
        odd = next((k for k, v in state.items() if not isinstance(v, Tensor)), None)
        what = f"entry {odd!r} is a {type(state[odd]).__name__}" if odd else _describe(state)
        raise CheckpointImportError(f"{path}: its {layout} weights are no state dict ({what})")
    return dict(state), layout


def _basicsr_key(payload: Mapping[str, object]) -> str | None:
    return next((key for key in BASICSR_KEYS if isinstance(payload.get(key), Mapping)), None)


def strip_wrappers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove wrapper prefixes that every key carries (``module.net.``, ``net.``...)."""
    state = dict(state)
    while state and (prefix := next((p for p in WRAPPER_PREFIXES if _all_start(state, p)), "")):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _is_state_dict(payload: object) -> bool:
    return (
        isinstance(payload, Mapping)
        and bool(payload)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in payload.items())
    )


def _all_start(state: Mapping[str, Tensor], prefix: str) -> bool:
    return all(key.startswith(prefix) for key in state)


def importable() -> list[str]:
    """Names of the architectures whose official checkpoints import."""
    return sorted(name for name, entry in MODELS.items() if entry.official is not None)


def _release(arch: str) -> OfficialRelease:
    entry = _entry(arch)
    if entry.official is None:
        raise CheckpointImportError(
            f"{arch} is not a published network with a checkpoint to import "
            f"(official checkpoints import for: {', '.join(importable())})"
        )
    return entry.official


def _entry(arch: str) -> ModelEntry:
    if arch not in MODELS:
        raise CheckpointImportError(f"unknown model {arch!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[arch]


def _our_keys(state: dict[str, Tensor], release: OfficialRelease) -> dict[str, Tensor]:
    unused = [re.compile(pattern) for pattern in release.unused]
    rename = release.rename or (lambda key: key)
    return {
        rename(key): tensor
        for key, tensor in state.items()
        if not any(pattern.fullmatch(key) for pattern in unused)
    }


def _skeleton(arch: str, preset: str) -> nn.Module:
    """The preset's network for its names and shapes, without allocating its weights where the
    builder allows (a paper-size import then holds one copy of the weights, not two)."""
    entry = _entry(arch)
    if preset not in entry.presets:
        raise CheckpointImportError(
            f"{arch} has no preset {preset!r} (presets: {', '.join(entry.presets)})"
        )
    spec = ModelSpec(arch, preset)
    try:
        with torch.device("meta"):
            return spec.build()
    except (NotImplementedError, RuntimeError):  # a builder that needs real data at build time
        return spec.build()


def _read(path: Path) -> object:
    if not path.is_file():
        raise CheckpointImportError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # weights_only: unpickling builds tensors and plain containers, never calls the file's code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a refused global, a truncated file, not a checkpoint at all
        raise CheckpointImportError(
            f"{path}: not a loadable checkpoint ({_reason(error)})"
        ) from None


def _reason(error: Exception) -> str:
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if refused:
        return f"it would need {refused.group(1)}, and loading never runs code from a checkpoint"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe(payload: object) -> str:
    if isinstance(payload, Mapping):
        keys = ", ".join(map(str, list(payload)[:5]))
        return f"a dict with keys {keys}" if keys else "an empty dict"
    return f"a {type(payload).__name__}"


def prompt_maps(arch: str, path: str | Path) -> dict[str, Tensor]:
    """The prompt maps a release keeps beside its checkpoint (a ``.npy`` array, read without
    pickles), under our key for them."""
    release = _release(arch)
    if release.prompts_key is None:
        raise CheckpointImportError(f"{path}: {arch} keeps no prompt maps outside its checkpoint")
    try:
        array = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as error:
        reason = _reason(error)
        raise CheckpointImportError(f"{path}: not a readable .npy array ({reason})") from None
    return {release.prompts_key: torch.from_numpy(np.ascontiguousarray(array)).float()}


def classifier_weights(arch: str, path: str | Path) -> dict[str, Tensor]:
    """A component released as a file of its own (MiOIR's Classifier.pth), in any layout the
    importer reads, under our key prefix for it."""
    release = _release(arch)
    if release.component_prefix is None:
        raise CheckpointImportError(f"{path}: {arch} has no separately released component")
    path = Path(path)
    state, _ = find_weights(_read(path), path)
    return {f"{release.component_prefix}{k}": v for k, v in strip_wrappers(state).items()}
