"""A registered model as MLflow loads and serves it: images in, images out, no pickle anywhere.

A registered version is an MLflow pyfunc model whose ``loader_module`` is this module and whose
only data is ``data/model.ckpt``, our checkpoint file (:mod:`allinone.models.checkpoint`: the
ModelSpec card and tensors, read weights-only). ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` import this module from the installed package and call
:func:`_load_pyfunc`, which builds the network from the card and loads the tensors: the artifact
holds no pickled object and no code, so whoever can write to the registry's artifact store can
change weights but not run code where the model is loaded. (MLflow itself still obeys the MLmodel
file, which could be edited to name other code; our own verbs read the checkpoint directly.)

``predict`` takes one image or a batch, as clients send them:

- encoded image bytes (PNG, JPEG, ...), or base64 strings of them (what JSON carries; a
  ``data:image/...;base64,`` URL too);
- HWC (or HW) integer arrays in 0..255, one image, or NHWC batches of them;
- NCHW float arrays in [0, 1];
- a dict or a DataFrame with an ``image`` column of any of the above and an optional ``task``
  column (one task per image, or one for all).

Params: ``task`` (``auto``: the model decides; a column overrides it), ``tile`` (0: the whole
image at once, else tiles of this many pixels, at least 32) and ``output`` (``png``, or ``array``:
HWC uint8 arrays, and an NCHW float32 array for NCHW input). The answer has one restored image per
input, each the size of its input. A bad input raises :class:`ServingError`: one line naming the
image and what is wrong, never the data.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ParamSchema, ParamSpec

from allinone.data.images import ImageReadError, decode_image_bytes, encode_png, to_uint8
from allinone.evaluate.metrics import restore_tiled, to_image, to_tensor
from allinone.models.checkpoint import load_checkpoint

WEIGHTS = "data/model.ckpt"  # where MLflow keeps the checkpoint inside a logged model
AUTO, PNG, ARRAY = "auto", "png", "array"
MIN_TILE = 32  # as `allinone restore --tile`
_CHANNELS = (1, 3)


def signature() -> ModelSignature:
    """No input schema (MLflow would force one layout on every client), the params typed."""
    return ModelSignature(
        params=ParamSchema(
            [
                ParamSpec("task", "string", AUTO),
                ParamSpec("tile", "long", 0),
                ParamSpec("output", "string", PNG),
            ]
        )
    )


def input_example() -> list[str]:
    """What a client sends: one base64 PNG. 32 x 32, small on purpose: the registry's tests
    restore other sizes to show that nothing is fixed by it."""
    pixels = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    return [base64.b64encode(encode_png(pixels)).decode("ascii")]


class ServingError(MlflowException):
    """A request the model cannot restore; the message says which image and why.

    MLflow's scoring server rewrites the message of an MlflowException raised by ``predict`` to
    "Failed to predict data '<the whole request>'", megabytes of base64 for one photo; this one
    keeps the line it was raised with, so the client reads what is wrong."""

    def __init__(self, message: str) -> None:
        self._line = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, _rewritten: str) -> None:
        pass  # see the class docstring


@dataclass(frozen=True)
class Request:
    images: tuple[np.ndarray, ...]  # float32 HxWx3 in [0, 1]
    tasks: tuple[str | None, ...]  # per image; None: blind
    nchw: bool  # the client sent an NCHW float batch (array output answers in kind)


def parse_request(model_input: Any, params: dict[str, Any] | None = None) -> Request:
    """The images and their tasks in whatever form ``model_input`` carries them."""
    default = _task_name((params or {}).get("task", AUTO))
    columns = _columns(model_input)
    if columns is not None:
        images, tasks = columns
        parsed = [_one_image(item, i) for i, item in enumerate(images)]
        if tasks is None:
            tasks = [default] * len(parsed)
        elif len(tasks) == 1:  # one task for every image
            tasks = tasks * len(parsed)
        elif len(tasks) != len(parsed):
            raise ServingError(f"{len(tasks)} tasks for {len(parsed)} images")
        return Request(tuple(parsed), tuple(_task_name(t) for t in tasks), nchw=False)
    if _is_nchw(model_input):
        images = tuple(to_image(torch.from_numpy(np.asarray(x, np.float32))) for x in model_input)
        return Request(images, (default,) * len(images), nchw=True)
    items = _items(model_input)
    images = tuple(_one_image(item, i) for i, item in enumerate(items))
    return Request(images, (default,) * len(images), nchw=False)


def _columns(model_input: Any) -> tuple[list, list | None] | None:
    """(images, tasks or None) of a dict or DataFrame input; None for any other input."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        table = {name: model_input[name].tolist() for name in model_input.columns}
    elif isinstance(model_input, dict):
        table = {name: _items(value) for name, value in model_input.items()}
    else:
        return None
    if "image" not in table:
        names = ", ".join(map(str, table))
        raise ServingError(f"no 'image' column in the input (its columns: {names})")
    unknown = sorted(set(map(str, table)) - {"image", "task"})
    if unknown:
        raise ServingError(f"unknown input columns {', '.join(unknown)} (known: image, task)")
    return _items(table["image"]), table.get("task")


def _items(model_input: Any) -> list:
    """One entry per image (an encoded item, or an array of one image), or per task."""
    if isinstance(model_input, (bytes, bytearray, str)):
        return [model_input]
    if isinstance(model_input, np.ndarray):
        if model_input.dtype.kind in "USO":
            return list(model_input.reshape(-1))
        if model_input.dtype.kind in "iu" and model_input.ndim == 4:
            return list(model_input)  # NHWC
        return [model_input]
    if isinstance(model_input, Sequence):
        return list(model_input)
    raise ServingError(f"input of type {type(model_input).__name__} is not an image: {_KINDS}")


_KINDS = (
    "send PNG/JPEG bytes (base64 strings in JSON), HWC uint8 arrays or NCHW float32 arrays "
    "in [0, 1]"
)


def _is_nchw(model_input: Any) -> bool:
    return (
        isinstance(model_input, np.ndarray)
        and model_input.dtype.kind == "f"
        and model_input.ndim == 4
        and model_input.shape[1] == 3
    )


def _one_image(item: Any, index: int) -> np.ndarray:
    name = f"image {index}"
    if isinstance(item, str):
        item = _from_base64(item, name)
    if isinstance(item, (bytes, bytearray)):
        try:
            return decode_image_bytes(bytes(item), name)
        except ImageReadError as err:
            raise ServingError(str(err)) from None
    array = np.asarray(item) if isinstance(item, (list, tuple, np.ndarray)) else None
    if array is None or array.dtype.kind not in "iu":
        raise ServingError(f"{name}: {_described(item)} is not an image: {_KINDS}")
    return _from_uint8(array, name)


def _from_base64(text: str, name: str) -> bytes:
    if text.startswith("data:"):  # a data URL, as browsers write them
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)  # line breaks allowed
    except (binascii.Error, ValueError):
        raise ServingError(f"{name}: a string that is not base64 of an image file") from None


def _from_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in _CHANNELS or min(array.shape[:2]) < 1:
        raise ServingError(
            f"{name}: an integer array of shape {array.shape} is not an HxW or HxWxC image "
            "(C 1 or 3)"
        )
    if array.min() < 0 or array.max() > 255:
        raise ServingError(f"{name}: integer pixels must be in 0..255 (uint8)")
    pixels = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array
    return np.ascontiguousarray(pixels, dtype=np.float32) / 255.0


def _described(item: Any) -> str:
    if isinstance(item, np.ndarray):
        return f"an array of shape {item.shape} and dtype {item.dtype}"
    return f"a value of type {type(item).__name__}"


def _task_name(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):  # a DataFrame's gap
        return None
    name = str(value).strip()
    return None if name in ("", AUTO) else name


@dataclass(frozen=True)
class Settings:
    tile: int | None
    output: str

    @classmethod
    def of(cls, params: dict[str, Any] | None) -> Settings:
        params = params or {}
        tile, output = int(params.get("tile") or 0), str(params.get("output") or PNG)
        if tile and tile < MIN_TILE:
            raise ServingError(f"tile {tile}: 0 (the whole image) or at least {MIN_TILE} pixels")
        if output not in (PNG, ARRAY):
            raise ServingError(f"output {output!r}: {PNG!r} or {ARRAY!r}")
        return cls(tile or None, output)


class ImageRestorer:
    """What ``mlflow.pyfunc.load_model`` returns the ``predict`` of."""

    def __init__(self, module: torch.nn.Module, task_names: tuple[str, ...]) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.module = module.to(self.device).eval()
        self.task_names = task_names

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        settings = Settings.of(params)
        request = parse_request(model_input, params)
        task_ids = [self._task_id(task) for task in request.tasks]  # all checked before any work
        restored = [
            self.restore(image, task_id, settings.tile)
            for image, task_id in zip(request.images, task_ids, strict=True)
        ]
        if settings.output == PNG:
            return [encode_png(pixels) for pixels in restored]
        if request.nchw:
            return np.stack([np.transpose(p, (2, 0, 1)) for p in restored]).astype(np.float32)
        return [to_uint8(p) for p in restored]

    def restore(self, pixels: np.ndarray, task_id: int | None, tile: int | None) -> np.ndarray:
        batch = to_tensor(pixels).to(self.device)
        ids = None if task_id is None else torch.tensor([task_id], device=self.device)
        return to_image(restore_tiled(self.module, batch, tile, task_id=ids))

    def _task_id(self, task: str | None) -> int | None:
        if task is None:
            return None  # blind: the model decides
        if task not in self.task_names:
            raise ServingError(
                f"task {task!r}: not a task of this model (trained on "
                f"{', '.join(self.task_names)}; or 'auto')"
            )
        return self.task_names.index(task)


def _load_pyfunc(path: str) -> ImageRestorer:
    """MLflow's entry point: ``path`` is the model's ``data/model.ckpt``, read weights-only."""
    checkpoint = load_checkpoint(path)
    return ImageRestorer(checkpoint.build(), checkpoint.spec.task_names)
