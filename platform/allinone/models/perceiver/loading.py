"""Pretrained parts from local paths, never the Hub: a diffusers Stable Diffusion folder as users
have it on disk (``vae/``, ``unet/``, ``text_encoder/``), its components one by one, and open_clip
checkpoints. Every mismatch is one line that names the path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TypeVar

import torch
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from allinone.models.weights import read_state_file, state_dict_mismatch

Component = TypeVar("Component", bound=ModelMixin)

# What a Stable Diffusion folder must hold for us, each a diffusers / transformers save folder.
SD_PARTS = ("vae", "unet", "text_encoder")


def sd_part(folder: str | Path, part: str) -> Path:
    path = Path(folder) / part
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"Stable Diffusion folder {folder} has no {part}/config.json (expected a diffusers "
            f"pipeline folder with {', '.join(p + '/' for p in SD_PARTS)})"
        )
    return path


def load_diffusers_folder(cls: type[Component], path: str | Path, what: str) -> Component:
    """``cls.from_pretrained(path)`` on a local ``save_pretrained`` folder.

    diffusers fills weights missing from the file with random ones and only logs it; here any
    missing, unexpected or mismatched weight is an error naming the folder.
    """
    path = Path(path)
    config = _read_config(path, what)
    if config.get("_class_name") != cls.__name__:
        raise ValueError(
            f"{what} folder {path} holds a {config.get('_class_name')}, not a {cls.__name__}"
        )
    try:
        # low_cpu_mem_usage=False is what diffusers falls back to without `accelerate` anyway.
        model, info = cls.from_pretrained(
            path, local_files_only=True, low_cpu_mem_usage=False, output_loading_info=True
        )
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{what} folder {path} could not be loaded: {first}") from error
    problems = [f"{len(keys)} {kind}: {', '.join(keys[:5])}" for kind, keys in info.items() if keys]
    if problems:
        raise ValueError(f"{what} folder {path} does not fit its config: {'; '.join(problems)}")
    return model


def _read_config(path: Path, what: str) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{what} folder {path} not found or without config.json (expected a diffusers "
            f"save_pretrained folder)"
        )
    return json.loads(config_file.read_text())


# ---------------------------------------------------------------------------------------------
# The OpenCLIP text tower: from SD's text_encoder/ (transformers layout) or an open_clip file
# ---------------------------------------------------------------------------------------------

# transformers' CLIPTextModel names -> open_clip's, per layer and outside the layers.
_HF_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
# Geometry a transformers text config must share with the tower: (its key, the tower's value).
_HF_GEOMETRY = {
    "hidden_size": lambda t: t.width,
    "num_hidden_layers": lambda t: len(t.transformer.resblocks),
    "num_attention_heads": lambda t: t.heads,
    "max_position_embeddings": lambda t: t.context_length,
    "vocab_size": lambda t: t.vocab_size,
}


def load_text_tower(tower: nn.Module, path: str | Path, what: str) -> None:
    """Load an open_clip ``TextTransformer`` from a transformers ``text_encoder/`` folder (SD's
    own layout) or an open_clip checkpoint file; the file's layers past the tower's are SD's
    unused last layer and are dropped, as are open_clip's pooled-output projection and scale."""
    path = Path(path)
    if path.is_dir():
        config = _read_config(path, what)
        wrong = [
            f"{key} {config.get(key)} vs {value(tower)}"
            for key, value in _HF_GEOMETRY.items()
            if config.get(key) != value(tower)
        ]
        if wrong:
            raise ValueError(
                f"{what} folder {path} does not fit the text tower: {', '.join(wrong)}"
            )
        state = open_clip_from_transformers(read_state_file(_weights_file(path, what), what))
    else:
        state = _text_part(read_state_file(path, what), len(tower.transformer.resblocks))
    problems = state_dict_mismatch(tower, state)
    if problems:
        raise ValueError(f"{what} {path} does not fit the text tower: {problems}")
    tower.load_state_dict(state)


def _weights_file(folder: Path, what: str) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{what} folder {folder} has no model.safetensors or pytorch_model.bin")


def open_clip_from_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers CLIPTextModel keys -> open_clip TextTransformer keys (q, k, v concatenated)."""
    out = {new: state[old] for old, new in _HF_TOP.items() if old in state}
    layers = {
        int(m.group(1))
        for k in state
        if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))
    }
    for i in sorted(layers):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(qkv)
            for old, new in _HF_LAYER.items():
                out[f"{oc}{new}.{kind}"] = state[f"{hf}{old}.{kind}"]
    return out


def _text_part(state: dict[str, Tensor], layers: int) -> dict[str, Tensor]:
    """The text tower's keys of a whole open_clip CLIP checkpoint, up to ``layers`` blocks."""
    unused = re.compile(r"visual\..*|text_projection|logit_scale|transformer\.resblocks\.(\d+)\..*")

    def kept(key: str) -> bool:
        match = unused.fullmatch(key)
        return match is None or (match.group(1) is not None and int(match.group(1)) < layers)

    return {k: v for k, v in state.items() if kept(k)}
