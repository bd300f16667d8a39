"""Serving a registered model: the pyfunc takes what image clients send and answers with images of
the input's size, in-process and behind a real ``mlflow models serve`` on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from allinone.data.images import to_uint8
from allinone.evaluate.metrics import restore_tiled, to_image, to_tensor
from allinone.models.checkpoint import Checkpoint
from allinone.models.spec import ModelSpec
from allinone.tracking.registry import log_and_register
from allinone.tracking.serving import ServingError
from conftest import TEST_SETS

PHOTO = TEST_SETS / "CBSD68" / "101085.png"  # 321 x 481 PNG
JPEG = TEST_SETS / "SOTS" / "hazy" / "0002_0.8_0.08.jpg"  # 550 x 413
TASKS = ("denoise", "derain")
URI = "models:/served@champion"


@dataclass(frozen=True)
class Registry:
    uri: str  # the tracking store
    module: torch.nn.Module  # what was registered


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    folder = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serving", artifact_location=(folder / "a").as_uri())
    torch.manual_seed(0)
    spec = ModelSpec("promptir", "tiny", task_names=TASKS)
    module = spec.build().eval()
    with mlflow.start_run(experiment_id=experiment):
        log_and_register(Checkpoint(spec, module.state_dict()), "served", {}, "serving", None)
    return Registry(uri, module)


@pytest.fixture(scope="module")
def model(registry):
    mlflow.set_tracking_uri(registry.uri)
    return mlflow.pyfunc.load_model(URI)


def _photo(box=(0, 0, 123, 77)) -> np.ndarray:
    """A crop of a real photo, HWC uint8: 77 x 123, a size no model pads away."""
    return np.asarray(Image.open(PHOTO).convert("RGB").crop(box))


def _encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _decoded(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _expected(registry, pixels: np.ndarray, task: str | None, tile: int | None = None):
    task_id = None if task is None else torch.tensor([TASKS.index(task)])
    batch = to_tensor(pixels.astype(np.float32) / 255.0)
    return to_image(restore_tiled(registry.module, batch, tile, task_id=task_id))


def test_every_kind_of_input_comes_back_as_a_png_of_its_size(model) -> None:
    photo = _photo()
    b64 = base64.b64encode(_encoded(photo)).decode()
    jpeg = JPEG.read_bytes()
    nchw = np.random.default_rng(0).random((2, 3, 45, 70), np.float32)
    cases = {
        "png bytes": (_encoded(photo), [photo.shape]),
        "jpeg bytes": (jpeg, [(413, 550, 3)]),
        "base64 strings": ([b64, base64.b64encode(jpeg).decode()], [photo.shape, (413, 550, 3)]),
        "data url": (f"data:image/png;base64,{b64}", [photo.shape]),
        "hwc uint8": (photo, [photo.shape]),
        "grey hw uint8": (photo[..., 0], [photo.shape]),
        "nhwc batch": (np.stack([photo, photo[::-1]]), [photo.shape] * 2),
        "nchw float": (nchw, [(45, 70, 3)] * 2),
        "dataframe": (pd.DataFrame({"image": [b64], "task": ["derain"]}), [photo.shape]),
        "dict": ({"image": [b64, b64]}, [photo.shape] * 2),
        "dict of a batch": ({"image": np.stack([photo] * 2), "task": "derain"}, [photo.shape] * 2),
    }
    for kind, (given, shapes) in cases.items():
        answer = model.predict(given)
        assert [_decoded(png).shape for png in answer] == shapes, kind


def test_answers_are_the_model_applied_with_its_task_and_tile(model, registry) -> None:
    photo = _photo()
    for task in (None, "denoise", "derain"):
        params = {"output": "array", "task": task or "auto"}
        restored = model.predict(photo, params=params)[0]
        assert restored.dtype == np.uint8 and restored.shape == photo.shape
        np.testing.assert_array_equal(restored, to_uint8(_expected(registry, photo, task)))
    # A task column overrides the param, per image.
    table = pd.DataFrame({"image": [photo, photo], "task": ["derain", None]})
    both = model.predict(table, params={"task": "denoise", "output": "array"})
    np.testing.assert_array_equal(both[0], to_uint8(_expected(registry, photo, "derain")))
    np.testing.assert_array_equal(both[1], to_uint8(_expected(registry, photo, "denoise")))
    tiled = model.predict(photo, params={"tile": 48, "output": "array", "task": "derain"})[0]
    np.testing.assert_array_equal(tiled, to_uint8(_expected(registry, photo, "derain", tile=48)))
    png = model.predict(photo, params={"task": "derain"})[0]
    np.testing.assert_array_equal(_decoded(png), to_uint8(_expected(registry, photo, "derain")))


def test_a_bad_input_gets_one_short_line_not_its_data(model) -> None:
    b64 = base64.b64encode(_encoded(_photo())).decode()
    cases = [
        (np.zeros((5, 7, 9)), None, "image 0: an array of shape (5, 7, 9) and dtype float64"),
        (np.full((8, 8, 3), 300), None, "image 0: integer pixels must be in 0..255"),
        ([b64, base64.b64encode(b"not an image").decode()], None, "image 1: cannot decode"),
        ([b64, "%%%"], None, "image 1: a string that is not base64"),
        (pd.DataFrame({"picture": [b64]}), None, "no 'image' column in the input"),
        ({"image": [b64], "mask": [b64]}, None, "unknown input columns mask"),
        ({"image": [b64] * 3, "task": ["derain", "denoise"]}, None, "2 tasks for 3 images"),
        ([b64], {"task": "snow"}, "task 'snow': not a task of this model (trained on denoise"),
        ([b64], {"tile": 8}, "tile 8: 0 (the whole image) or at least 32"),
        ([b64], {"output": "jpeg"}, "output 'jpeg'"),
        (3.5, None, "input of type float is not an image"),
    ]
    for given, params, says in cases:
        with pytest.raises(ServingError) as caught:
            model.predict(given, params=params)
        message = caught.value.message
        assert says in message and "\n" not in message and len(message) < 300, message


# --------------------------------------------------------------------------- a real server
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as answer:
        return json.load(answer)


def _wait_until_up(server: subprocess.Popen, port: int, log: Path, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no answer on port {port} after {limit_s} s: {log.read_text()[-3000:]}")


def test_mlflow_models_serve_restores_a_posted_photo(registry, model, tmp_path) -> None:
    port, log = _free_port(), tmp_path / "serve.log"
    bin_dir = Path(sys.executable).parent  # the server runs uvicorn from the environment's bin
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry.uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    serve = f"models serve --env-manager local -m {URI} --host 127.0.0.1 --port {port}"
    command = [str(bin_dir / "mlflow"), *serve.split()]
    with log.open("w") as out:
        # Its own session, so that nothing it starts can outlive the test (see _stop).
        server = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_until_up(server, port, log)
        url = f"http://127.0.0.1:{port}/invocations"
        photo = base64.b64encode(PHOTO.read_bytes()).decode()
        answer = _post(url, {"inputs": [photo], "params": {"task": "denoise"}})
        restored = tmp_path / "restored.png"
        restored.write_bytes(base64.b64decode(answer["predictions"][0]))
        with Image.open(restored) as image, Image.open(PHOTO) as sent:
            assert (image.format, image.size) == ("PNG", sent.size)
        local = model.predict(PHOTO.read_bytes(), params={"task": "denoise"})[0]
        np.testing.assert_array_equal(_decoded(restored.read_bytes()), _decoded(local))
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(url, {"inputs": [photo], "params": {"task": "snow"}})
        error = json.loads(refused.value.read())
        assert refused.value.code == 400 and "\n" not in error["message"]
        assert error["message"].startswith("task 'snow': not a task of this model")
    finally:
        _stop(server, port)


def _listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _stop(server: subprocess.Popen, port: int, limit_s: float = 60) -> None:
    """Stop the server as the README does, by its pid: MLflow has the uvicorn it runs follow
    its death (PR_SET_PDEATHSIG). Whatever of its session still listens is a failure."""
    server.terminate()
    server.wait(timeout=limit_s)
    deadline = time.monotonic() + limit_s
    while _listens(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _listens(port):
        os.killpg(server.pid, signal.SIGKILL)
        raise AssertionError(f"port {port} still listened after the server's pid was stopped")
