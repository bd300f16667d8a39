"""MPerceiver trained as published, through the platform's own curriculum on a local Ray cluster:
the degradation predictor in a stage of its own first, the prompts and adapters (noise
prediction) on the curriculum's stage, the refinement decoder last. Stable Diffusion's parts come
from a local folder the test saves, stay frozen and are never copied into a checkpoint."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from allinone import models
from allinone.config import load_pipeline
from allinone.curriculum.run import run_pipeline
from allinone.curriculum.state import RunOptions
from allinone.models.perceiver import STAGE_PARAMETERS
from allinone.models.weights import read_state_file
from allinone.tracking.resolve import resolve_model
from conftest import REPO
from test_models_perceiver import save_sd_folder

FROM_SD = ("vae.", "unet.", "cond_stage_model.model.")
STAGES = ["stage1-predictor", "mixed", "stage3-refinement"]


@pytest.fixture(scope="module")
def perceiver_run(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("perceiver")
    torch.manual_seed(1)
    save_sd_folder(models.build("perceiver", "tiny"), folder / "sd")
    path = folder / "perceiver.yaml"
    path.write_text(f"""
name: perceiver-curriculum
tasks_dir: {REPO / "tasks"}
tasks: [denoise, dehaze]
data: {{samples_per_shard: 8, crop: 32, batch_size: 2}}
model: {{name: perceiver, preset: tiny, sample_steps: 2, pretrained_sd: {folder / "sd"}}}
curriculum:
  mode: mixed
  steps: [2]
  components: [{{trains: predictor, steps: 2, before: true}}, {{trains: refinement, steps: 2}}]
train: {{lr: 1.0e-2, zero_stage: 2, checkpoint_every: 2, log_every: 1, eval_every: 2,
         eval_sample_steps: 1}}
eval: {{max_images: 1}}
""")
    pipeline = load_pipeline(path)
    summary = run_pipeline(pipeline, RunOptions(folder / "work"), say=lambda *_: None)
    return folder, summary


def stage_weights(work: Path, stage: str) -> dict[str, torch.Tensor]:
    return read_state_file(work / "stages" / stage / "model.pt", stage)


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in after if not torch.equal(before[k], after[k])}


def test_the_predictor_trains_first_and_the_refinement_decoder_last(perceiver_run) -> None:
    folder, summary = perceiver_run
    work = folder / "work"
    assert list(summary.matrix) == STAGES
    weights = [stage_weights(work, stage) for stage in STAGES]
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()

    def only(stage: str, keys: set[str]) -> bool:
        names = STAGE_PARAMETERS[stage]  # modules, or a parameter itself (tp)
        return bool(keys) and all(k in names or k.startswith(tuple(n + "." for n in names))
                                  for k in keys)  # fmt: skip

    assert only("diffusion", changed(weights[0], weights[1]))  # the predictor stays frozen
    assert only("refinement", changed(weights[1], weights[2]) - {"refined"})
    assert not weights[1]["refined"] and weights[2]["refined"]  # its decoder is used from now


def test_stable_diffusions_parts_stay_out_of_every_checkpoint(perceiver_run) -> None:
    folder, _ = perceiver_run
    work = folder / "work"
    for stage in STAGES:
        assert not any(k.startswith(FROM_SD) for k in stage_weights(work, stage)), stage
    # The DeepSpeed states a restarted worker resumes from leave the frozen parameters out.
    states = list((work / "ray").glob("**/mp_rank_00_model_states.pt"))
    assert states
    for state in states:
        module = torch.load(state, map_location="cpu", weights_only=True)["module"]
        assert module and not any(k.startswith(FROM_SD) for k in module), state


def test_the_registered_perceiver_restores_any_size_with_plain_mlflow(perceiver_run) -> None:
    folder, summary = perceiver_run
    mlflow.set_tracking_uri(summary.workspace.tracking_uri)
    served = mlflow.pyfunc.load_model(summary.registered.uri)
    image = np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    (restored,) = served.predict(image, params={"output": "array"})
    assert restored.shape == image.shape and restored.dtype == np.uint8
    # The registered card names the folder its frozen parts load from.
    resolved = resolve_model(summary.registered.uri, summary.workspace.tracking_uri)
    assert resolved.spec.overrides["pretrained_sd"] == str(folder / "sd")
    assert resolved.module.pretrained_sources()["unet"] == str(folder / "sd" / "unet")
