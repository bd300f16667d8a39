"""The model registry: what a registered version carries, when ``champion`` moves, and that plain
``mlflow.pytorch.load_model`` in a fresh process restores an image of a new size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from allinone.tracking.registry import CHALLENGER, CHAMPION, log_and_register
from allinone.tracking.resolve import resolve_model
from conftest import allinone_cli
from test_resolve import RecordedRun, record_run

SUITE = "all-in-one:denoise"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> RecordedRun:
    return record_run(tmp_path_factory.mktemp("registry"), "registry")


def _cli(*args: str, uri: str) -> subprocess.CompletedProcess:
    return allinone_cli(*args, env={**os.environ, "MLFLOW_TRACKING_URI": uri})


def test_champion_moves_only_when_beaten_on_the_same_suite(recorded) -> None:
    mlflow.set_tracking_uri(recorded.uri)
    model = resolve_model(str(recorded.weights)).module
    client = MlflowClient()

    def register(score: float, suite: str = SUITE) -> dict:
        with mlflow.start_run(experiment_id=client.get_run(recorded.parent_id).info.experiment_id):
            metrics = {"final/average_psnr": score}
            return log_and_register(model, "alias-rule", metrics, suite, score)

    steps = [
        (25.0, SUITE, CHAMPION, 1),  # the first version
        (24.0, SUITE, CHALLENGER, 1),  # worse
        (25.0, SUITE, CHALLENGER, 1),  # a tie does not beat
        (26.0, SUITE, CHAMPION, 4),  # better
        (40.0, "all-in-one:denoise,dehaze", CHALLENGER, 4),  # scored on another suite
    ]
    for score, suite, alias, champion in steps:
        result = register(score, suite)
        assert result["alias"] == alias, result["reason"]
        assert int(client.get_model_version_by_alias("alias-rule", CHAMPION).version) == champion
    assert int(client.get_model_version_by_alias("alias-rule", CHALLENGER).version) == 5


def test_register_a_finished_run_from_the_cli(recorded) -> None:
    result = _cli("register", "--run-id", recorded.parent_id, uri=recorded.uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered allinone v1 as @champion (first model)" in result.stdout
    info = mlflow.models.get_model_info("models:/allinone@champion")
    assert info.run_id == recorded.parent_id
    score = recorded.summary["final"]["final/average_psnr"]
    logged = mlflow.get_logged_model(info.model_id)
    assert {m.key: m.value for m in logged.metrics}["final/average_psnr"] == pytest.approx(score)
    assert info.metadata["pipeline"]["name"] == "registry"
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, -1, -1)
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
    mlflow.set_tracking_uri(recorded.uri)
    if not MlflowClient().search_model_versions("name = 'allinone'"):
        with mlflow.start_run(run_id=recorded.parent_id):
            model = resolve_model(str(recorded.weights)).module
            log_and_register(model, "allinone", {}, SUITE, None)
    example = mlflow.models.get_model_info("models:/allinone@champion").saved_input_example_info
    image = np.random.default_rng(3).random((1, 3, 45, 70), dtype=np.float32)
    assert example and image.shape[-2:] != (32, 32)  # the logged example is 32 x 32
    np.save(tmp_path / "image.npy", image)
    with torch.no_grad():
        expected = resolve_model(str(recorded.weights)).module(torch.from_numpy(image)).numpy()
    script = f"""
import json, numpy as np, torch, mlflow
model = mlflow.pytorch.load_model("models:/allinone@champion")
with torch.no_grad():
    out = model(torch.from_numpy(np.load({str(tmp_path / "image.npy")!r}))).numpy()
np.save({str(tmp_path / "out.npy")!r}, out)
print(json.dumps({{"module": type(model).__module__, "shape": list(out.shape)}}))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": recorded.uri}
    # A fresh interpreter in another folder: only the registry and the logged files to go on.
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["shape"] == [1, 3, 45, 70]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)
