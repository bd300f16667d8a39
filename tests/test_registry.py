"""The model registry: what a registered version carries, when ``champion`` moves, that plain
``mlflow.pyfunc.load_model`` in a fresh process restores an image of a new size, and that nothing
written into the registry's artifacts runs code where a model is loaded."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from allinone.evaluate.metrics import to_image, to_tensor
from allinone.tracking.registry import CHALLENGER, CHAMPION, log_and_register
from allinone.tracking.resolve import ResolveError, resolve_model
from allinone.tracking.serving import WEIGHTS
from conftest import allinone_cli
from test_resolve import PHOTO, RecordedRun, assert_refused_unrun, record_run, write_crafted_pickle

SUITE = "all-in-one:denoise"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> RecordedRun:
    return record_run(tmp_path_factory.mktemp("registry"), "registry")


def _cli(*args: object, uri: str) -> subprocess.CompletedProcess:
    return allinone_cli(*args, env={**os.environ, "MLFLOW_TRACKING_URI": uri})


def _register(recorded: RecordedRun, name: str, score: float | None = None, suite: str = SUITE):
    mlflow.set_tracking_uri(recorded.uri)
    checkpoint = resolve_model(str(recorded.weights)).checkpoint()
    # A run of its own: the curriculum run's newest logged model is what `register` picks up.
    experiment = MlflowClient().get_run(recorded.parent_id).info.experiment_id
    with mlflow.start_run(experiment_id=experiment):
        metrics = {} if score is None else {"final/average_psnr": score}
        return log_and_register(checkpoint, name, metrics, suite, score)


def _stored_file(uri: str, path: str) -> Path:
    """Where the registry's artifact store keeps ``path`` of the model ``uri`` on this disk."""
    location = mlflow.get_logged_model(mlflow.models.get_model_info(uri).model_id)
    return Path(urlparse(location.artifact_location).path) / path


def test_champion_moves_only_when_beaten_on_the_same_suite(recorded) -> None:
    client = MlflowClient(recorded.uri)
    steps = [
        (25.0, SUITE, CHAMPION, 1),  # the first version
        (24.0, SUITE, CHALLENGER, 1),  # worse
        (25.0, SUITE, CHALLENGER, 1),  # a tie does not beat
        (26.0, SUITE, CHAMPION, 4),  # better
        (40.0, "all-in-one:denoise,dehaze", CHALLENGER, 4),  # scored on another suite
    ]
    for score, suite, alias, champion in steps:
        result = _register(recorded, "alias-rule", score, suite)
        assert result.alias == alias, result.reason
        assert int(client.get_model_version_by_alias("alias-rule", CHAMPION).version) == champion
    assert int(client.get_model_version_by_alias("alias-rule", CHALLENGER).version) == 5


def test_register_a_finished_run_from_the_cli(recorded) -> None:
    result = _cli("register", "--run-id", recorded.parent_id, uri=recorded.uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered allinone v1 as @champion (first model)" in result.stdout
    mlflow.set_tracking_uri(recorded.uri)
    info = mlflow.models.get_model_info("models:/allinone@champion")
    assert info.run_id == recorded.parent_id
    score = recorded.summary["final"]["final/average_psnr"]
    logged = mlflow.get_logged_model(info.model_id)
    assert {m.key: m.value for m in logged.metrics}["final/average_psnr"] == pytest.approx(score)
    assert info.metadata["pipeline"]["name"] == "registry"
    # Weights and a card, loaded by our module: no pickled model, no code among the artifacts.
    pyfunc = info.flavors["python_function"]
    assert pyfunc["loader_module"] == "allinone.tracking.serving" and pyfunc["data"] == WEIGHTS
    assert not pyfunc.get("code") and "pytorch" not in info.flavors
    assert [p["name"] for p in info.signature.params.to_dict()] == ["task", "tile", "output"]
    requirements = mlflow.pyfunc.get_model_dependencies("models:/allinone@champion")
    assert f"torch=={version('torch')}" in Path(requirements).read_text().splitlines()
    # The same run again: its logged model is registered as is, a tie, so it is the challenger.
    again = _cli("register", "--run-id", recorded.parent_id, "--name", "allinone", uri=recorded.uri)
    assert "registered allinone v2 as @challenger (does not beat champion v1" in again.stdout


def test_register_refuses_what_is_not_a_finished_curriculum_run(recorded) -> None:
    stage = recorded.stage_ids["stage1-denoise"]
    result = _cli("register", "--run-id", stage, uri=recorded.uri)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"run {stage} is a stage of run {recorded.parent_id}" in result.stderr
    missing = _cli("register", "--run-id", "f" * 32, uri=recorded.uri)
    assert missing.returncode == 2 and f"run {'f' * 32} not found" in missing.stderr


def test_plain_mlflow_loads_the_champion_in_a_fresh_process(recorded, tmp_path) -> None:
    _register(recorded, "plain")
    example = mlflow.models.get_model_info("models:/plain@champion").saved_input_example_info
    image = np.random.default_rng(3).random((1, 3, 45, 70), dtype=np.float32)
    assert example and image.shape[-2:] != (32, 32)  # the logged example is 32 x 32
    np.save(tmp_path / "image.npy", image)
    module = resolve_model(str(recorded.weights)).module
    with torch.no_grad():
        expected = module(torch.from_numpy(image)).clamp(0, 1).numpy()  # images: in [0, 1]
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    with torch.no_grad():
        expected_photo = module(to_tensor(photo.astype(np.float32) / 255))
    script = f"""
import json, numpy as np, mlflow
from PIL import Image
model = mlflow.pyfunc.load_model("models:/plain@champion")
out = model.predict(np.load({str(tmp_path / "image.npy")!r}), params={{"output": "array"}})
np.save({str(tmp_path / "out.npy")!r}, out)
png = model.predict(np.asarray(Image.open({str(PHOTO)!r}).convert("RGB")))[0]
open({str(tmp_path / "out.png")!r}, "wb").write(png)
print(json.dumps({{"shape": list(out.shape), "dtype": str(out.dtype)}}))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": recorded.uri}
    # A fresh interpreter in another folder: only the registry and the installed package.
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer == {"shape": [1, 3, 45, 70], "dtype": "float32"}
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)
    restored = np.asarray(Image.open(io.BytesIO((tmp_path / "out.png").read_bytes())))
    assert restored.shape == photo.shape
    assert np.abs(restored / 255 - to_image(expected_photo)).max() <= 1 / 255 + 1e-6


def test_a_crafted_pickle_in_the_registry_is_refused_unrun(recorded, tmp_path) -> None:
    _register(recorded, "tampered")
    marker = tmp_path / "pwned"
    write_crafted_pickle(_stored_file("models:/tampered@champion", WEIGHTS), marker)
    says = f"model models:/tampered@champion ({WEIGHTS}): refused"
    restore = _cli(
        "restore",
        PHOTO,
        "--model",
        "models:/tampered@champion",
        "--out",
        tmp_path / "o",
        uri=recorded.uri,
    )
    assert_refused_unrun(restore, marker, says)
    scored = _cli("eval", "--model", "models:/tampered/1", "--max-images", "1", uri=recorded.uri)
    assert_refused_unrun(scored, marker, "models:/tampered/1 (data/model.ckpt): refused")
    # Plain MLflow goes through our loader, which reads the same file tensors-only.
    with pytest.raises(Exception, match="not a loadable checkpoint"):
        mlflow.pyfunc.load_model("models:/tampered@champion")
    assert not marker.exists()


def test_a_model_logged_pickled_is_refused_before_it_is_read(recorded, tmp_path) -> None:
    # What earlier versions logged in a curriculum run: MLflow's pytorch flavor, pickled.
    mlflow.set_tracking_uri(recorded.uri)
    with mlflow.start_run(run_id=recorded.parent_id):
        mlflow.pytorch.log_model(
            torch.nn.Conv2d(3, 3, 1),
            name="model",
            serialization_format="pickle",
            registered_model_name="legacy",
            pip_requirements=["torch"],
        )
    marker = tmp_path / "pwned"
    write_crafted_pickle(_stored_file("models:/legacy/1", "data/model.pth"), marker)
    with pytest.raises(ResolveError, match="is not stored as an allinone checkpoint"):
        resolve_model("models:/legacy/1", recorded.uri)
    result = _cli(
        "restore", PHOTO, "--model", "models:/legacy/1", "--out", tmp_path / "o", uri=recorded.uri
    )
    assert_refused_unrun(result, marker, "register its run again (allinone register --run-id")
    # Registering the run again reads its stage weights, and stores them as a checkpoint.
    again = _cli("register", "--run-id", recorded.parent_id, "--name", "renewed", uri=recorded.uri)
    assert "registered renewed v1 as @champion" in again.stdout, again.stderr[-3000:]
    assert resolve_model("models:/renewed@champion", recorded.uri).task_names == ("denoise",)
    assert not marker.exists()
