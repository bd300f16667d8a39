"""The main job end to end on a local Ray cluster: stages, tracking, registry, faults, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from allinone.config import ConfigError, load_pipeline
from allinone.curriculum.plan import plan_stages, stage_plan
from allinone.curriculum.run import run_pipeline
from allinone.curriculum.state import CurriculumError, RunOptions
from allinone.data.stream import plan_reads
from allinone.tracking.runs import TrackingError
from allinone.train.job import FaultInjection
from conftest import REPO, allinone_cli


def write_pipeline(
    folder: Path,
    name: str,
    *,
    tasks=("denoise", "dehaze"),
    steps=(4, 4),
    mode: str = "cumulative",
    train: str = "",
    checkpoint_every: int = 2,
    model: str = "{name: promptir, preset: tiny}",
    components: str = "",
) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"""
name: {name}
tasks_dir: {REPO / "tasks"}
tasks: [{", ".join(tasks)}]
data: {{samples_per_shard: 16, crop: 32, batch_size: 4}}
model: {model}
curriculum: {{mode: {mode}, steps: [{", ".join(map(str, steps))}]{components}}}
train: {{lr: 1.0e-3, zero_stage: 2, checkpoint_every: {checkpoint_every}, log_every: 1{train}}}
eval: {{max_images: 1}}
""")
    return path


def test_a_component_trains_alone_in_its_own_stage(tmp_path: Path) -> None:
    """MiOIR's classifier, trained on its own as published: a stage after the curriculum on
    every task, in which only the classifier's parameters train."""
    path = write_pipeline(
        tmp_path,
        "ep",
        steps=(2, 3),
        model="{name: mioir_explicit, preset: tiny}",
        components=", components: [{trains: classifier, steps: 4}]",
    )
    stages = plan_stages(load_pipeline(path))
    assert [(s.name, s.tasks, s.steps, s.offset) for s in stages] == [
        ("stage1-denoise", ("denoise",), 2, 0),
        ("stage2-dehaze", ("denoise", "dehaze"), 3, 2),
        ("stage3-classifier", ("denoise", "dehaze"), 4, 5),
    ]
    model = stages[-1].model_spec(load_pipeline(path)).build()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("classifier.") for n in trained)
    restorer = stages[0].model_spec(load_pipeline(path)).build()
    assert restorer.state_dict().keys() == model.state_dict().keys()  # weights carry over
    assert not any(n.startswith("classifier.") and p.requires_grad
                   for n, p in restorer.named_parameters())  # fmt: skip
    refused = write_pipeline(
        tmp_path, "p", components=", components: [{trains: classifier, steps: 4}]"
    )
    with pytest.raises(ConfigError, match="curriculum.components.0.trains: model promptir"):
        load_pipeline(refused)


def test_components_train_before_or_after_the_curriculum(tmp_path: Path) -> None:
    """MPerceiver's degradation predictor trains first (the prompts it weighs train with it
    frozen), its refinement decoder last; a component's stage learns no task of its own."""
    components = (
        ", components: [{trains: predictor, steps: 3, before: true}, {trains: refinement, "
        "steps: 2}]"
    )
    path = write_pipeline(tmp_path, "mp", model="{name: perceiver, preset: tiny}",
                          components=components)  # fmt: skip
    stages = plan_stages(load_pipeline(path))
    assert [(s.name, s.steps, s.offset, s.trains) for s in stages] == [
        ("stage1-predictor", 3, 0, "predictor"),
        ("stage2-denoise", 4, 3, None),
        ("stage3-dehaze", 4, 7, None),
        ("stage4-refinement", 2, 11, "refinement"),
    ]
    built = stages[0].model_spec(load_pipeline(path)).build()
    assert built.training_stage == "predictor"
    assert stages[1].model_spec(load_pipeline(path)).build().training_stage == "diffusion"


def test_stage_plans_follow_the_mode(tmp_path: Path) -> None:
    three = ("denoise", "derain", "dehaze")
    cumulative = plan_stages(
        load_pipeline(write_pipeline(tmp_path, "c", tasks=three, steps=(1, 2, 3)))
    )
    assert [s.tasks for s in cumulative] == [three[:1], three[:2], three]
    assert [s.steps for s in cumulative] == [1, 2, 3]
    sequential = plan_stages(
        load_pipeline(
            write_pipeline(tmp_path, "s", tasks=three, steps=(1, 2, 3), mode="sequential")
        )
    )
    assert [s.tasks for s in sequential] == [(t,) for t in three]
    mixed = plan_stages(
        load_pipeline(write_pipeline(tmp_path, "m", tasks=three, steps=(6,), mode="mixed"))
    )
    assert [(s.tasks, s.steps) for s in mixed] == [(three, 6)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("e2e")
    pipeline = load_pipeline(write_pipeline(folder, "e2e", train=", eval_every: 2"))
    summary = run_pipeline(pipeline, RunOptions(folder / "work"), say=lambda *_: None)
    return folder / "work", summary


def test_a_stage_stream_turns_tasks_where_they_may_and_crops_as_asked(
    finished_run, tmp_path: Path
) -> None:
    workdir, _ = finished_run
    tasks = tmp_path / "tasks"
    shutil.copytree(REPO / "tasks", tasks)
    dehaze = tasks / "dehaze.yaml"
    dehaze.write_text(dehaze.read_text().replace("members: npy}", "members: npy, turns: false}"))
    path = tmp_path / "e2e.yaml"
    original = (workdir.parent / "e2e.yaml").read_text()
    path.write_text(
        original.replace(str(REPO / "tasks"), str(tasks)).replace(
            "batch_size: 4}", "batch_size: 4, crops_per_sample: 4}"
        )
    )
    pipeline = load_pipeline(path)
    plan = stage_plan(pipeline, workdir / "shards", plan_stages(pipeline)[-1])
    assert {t.name: t.turns for t in plan.tasks} == {"denoise": True, "dehaze": False}
    assert plan.crops_per_sample == 4
    assert {r["crops"] for r in plan_reads(plan)} == {4}


def test_curriculum_trains_every_stage_and_scores_every_task(finished_run) -> None:
    workdir, summary = finished_run
    assert list(summary.matrix) == ["stage1-denoise", "stage2-dehaze"]
    for scores in summary.matrix.values():
        assert set(scores) == {"denoise", "dehaze"} and all(5 < v < 60 for v in scores.values())
    for stage in summary.matrix:
        assert (workdir / "stages" / stage / "model.pt").is_file()
    assert summary.registered.alias == "champion"


def test_mlflow_holds_one_parent_and_a_nested_run_per_stage(finished_run) -> None:
    workdir, _ = finished_run
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["stage1-denoise", "stage2-dehaze"]
    assert parents[0].data.params["train.zero_stage"] == "2"
    assert "final/average_psnr" in parents[0].data.metrics
    # The work directory holds its artifacts too, not ./mlruns of wherever the run started.
    assert experiment.artifact_location == (workdir / "mlartifacts").resolve().as_uri()
    assert list((workdir / "mlartifacts").rglob("pipeline.json"))
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"test/denoise/psnr", "test/dehaze/ssim_y"} <= set(child.data.metrics)
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in history] == [1, 2, 3, 4]
        assert "train/samples_per_s" in child.data.metrics
        # trainer.fit() to the first step: Ray Train's processes and the engine take seconds
        assert 1.0 < child.data.metrics["train/startup_s"] < 300
        assert Path(child.data.params["checkpoint"]).is_file()
    artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id, "config")]
    assert "config/pipeline.json" in artifacts
    # Every 2 steps the workers scored the test splits: per stage, and joined into one
    # curriculum-long curve on the parent run.
    curve = client.get_metric_history(parents[0].info.run_id, "val/all-in-one/average_psnr")
    assert sorted(m.step for m in curve) == [2, 4, 6, 8]
    assert all(5 < m.value < 60 for m in curve)
    for child in children:
        steps = client.get_metric_history(child.info.run_id, "val/all-in-one/denoise/psnr")
        assert sorted(m.step for m in steps) == [2, 4]


def test_registered_model_restores_another_size(finished_run) -> None:
    import numpy as np

    workdir, _ = finished_run
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/allinone@champion")
    for shape in [(1, 3, 37, 53), (2, 3, 80, 64)]:
        batch = np.random.default_rng(0).random(shape, dtype=np.float32)
        restored = model.predict(batch, params={"output": "array"})
        assert restored.shape == shape and np.isfinite(restored).all()


def test_a_second_run_in_the_same_workdir_needs_resume(finished_run) -> None:
    workdir, _ = finished_run
    pipeline = load_pipeline(workdir.parent / "e2e.yaml")
    with pytest.raises(CurriculumError, match="--resume"):
        run_pipeline(pipeline, RunOptions(workdir), say=lambda *_: None)


def test_resuming_a_finished_run_says_so_and_registers_nothing(finished_run) -> None:
    workdir, summary = finished_run
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    versions = len(client.search_model_versions("name='allinone'"))
    said: list[str] = []
    again = run_pipeline(
        load_pipeline(workdir.parent / "e2e.yaml"), RunOptions(workdir, resume=True), said.append
    )
    assert len(said) == 1 and "finished earlier" in said[0], said
    assert str(summary.weights) in said[0] and f"v{summary.registered.version}" in said[0]
    assert again.registered is None and again.matrix == summary.matrix
    assert len(client.search_model_versions("name='allinone'")) == versions


def test_killed_worker_restarts_from_last_checkpoint(tmp_path: Path, ray_session) -> None:
    pipeline = load_pipeline(
        write_pipeline(tmp_path, "faulty", tasks=("denoise",), steps=(8,), checkpoint_every=3)
    )
    fault = FaultInjection(at_step=4, marker=str(tmp_path / "killed-once"))
    summary = run_pipeline(
        pipeline, RunOptions(tmp_path / "work", fault=fault, register=False), say=lambda *_: None
    )
    assert (tmp_path / "killed-once").read_text() == "4", "the worker process was killed at step 4"
    assert list(summary.matrix) == ["stage1-denoise"]
    # Steps 1-4 ran, the worker died before step 5, the restart resumed at the step-3
    # checkpoint: step 4 ran twice and was logged once.
    assert _stage_history(tmp_path / "work") == ([1, 2, 3, 4, 5, 6, 7, 8], [3])


def test_a_worker_killed_right_after_a_checkpoint_report_repeats_one_interval(
    tmp_path: Path, ray_session
) -> None:
    """Killed before Ray Train's controller collected the step-6 report (it polls every 2 s): that
    checkpoint is lost, the restart resumes at step 3, and nothing more than 4-6 runs again."""
    pipeline = load_pipeline(
        write_pipeline(tmp_path, "reported", tasks=("denoise",), steps=(8,), checkpoint_every=3)
    )
    fault = FaultInjection(at_step=6, marker=str(tmp_path / "killed"), after_checkpoint=True)
    workdir = tmp_path / "work"
    run_pipeline(pipeline, RunOptions(workdir, fault=fault, register=False), say=lambda *_: None)
    assert (tmp_path / "killed").read_text() == "6"
    assert _stage_history(workdir) == ([1, 2, 3, 4, 5, 6, 7, 8], [3])
    # The lost checkpoint's folder is gone; Ray Train keeps its last two (num_to_keep).
    kept = sorted((workdir / "ray").glob("*/checkpoint_*/stage_state.json"))
    assert sorted(json.loads(p.read_text())["step"] for p in kept) == [6, 8]
    assert len([p for p in (workdir / "ray").glob("*/checkpoint_*") if p.is_dir()]) == 2


def _stage_history(workdir: Path) -> tuple[list[int], list[int]]:
    """The steps the stage's MLflow run holds for train/loss, and the steps it resumed at."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = json.loads((workdir / "state.json").read_text())["stage_runs"]["stage1-denoise"]
    loss = sorted(m.step for m in client.get_metric_history(run, "train/loss"))
    return loss, sorted(int(m.value) for m in client.get_metric_history(run, "train/resumed_at"))


def test_non_finite_loss_fails_the_stage_and_keeps_the_checkpoint(
    tmp_path: Path, ray_session
) -> None:
    pipeline = load_pipeline(
        write_pipeline(
            tmp_path,
            "diverge",
            tasks=("denoise",),
            steps=(6,),
            checkpoint_every=1,
            train=", lr: 1.0e+20, grad_clip: null",
        )
    )
    with pytest.raises(CurriculumError, match=r"non-finite at step \d") as caught:
        run_pipeline(pipeline, RunOptions(tmp_path / "work", register=False), say=lambda *_: None)
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("diverge").experiment_id])
    assert runs and {r.info.status for r in runs} == {"FAILED"}
    named = str(caught.value).split("the last finite checkpoint is kept: ")[1]
    assert _all_finite(Path(named) / "model.pt"), "the checkpoint the error names is finite"
    assert json.loads((tmp_path / "work" / "state.json").read_text())["finished"] == {}


def test_weights_made_non_finite_by_an_update_are_never_saved(tmp_path: Path, ray_session) -> None:
    """The issue's drill: an infinite learning rate (config files now refuse it; a caller's own
    config is not checked by them) makes the first update's weights inf and NaN, while the loss
    before that update was finite. No checkpoint may hold them."""
    loaded = load_pipeline(
        write_pipeline(tmp_path, "overflow", tasks=("denoise",), steps=(4,), checkpoint_every=1)
    )
    train = loaded.config.train.model_copy(update={"lr": math.inf})  # not validated, on purpose
    pipeline = dataclasses.replace(loaded, config=loaded.config.model_copy(update={"train": train}))
    message = r"the weights became non-finite at step 1 .*; no finite checkpoint was saved"
    with pytest.raises(CurriculumError, match=message):
        run_pipeline(pipeline, RunOptions(tmp_path / "work", register=False), say=lambda *_: None)
    saved = list((tmp_path / "work" / "ray").rglob("checkpoint_*/model.pt"))
    assert all(_all_finite(path) for path in saved)


def _all_finite(weights: Path) -> bool:
    import torch

    state = torch.load(weights, weights_only=True)
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def test_tracking_server_that_does_not_answer(tmp_path: Path) -> None:
    pipeline = load_pipeline(write_pipeline(tmp_path, "nowhere", tasks=("denoise",), steps=(2,)))
    started = time.monotonic()
    with pytest.raises(TrackingError, match="127.0.0.1:9"):
        run_pipeline(pipeline, RunOptions(tmp_path / "work", tracking_uri="http://127.0.0.1:9"))
    assert time.monotonic() - started < 120
    assert not (tmp_path / "work" / "state.json").exists()


def test_cli_reports_unreachable_ray_address(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path, "noray", tasks=("denoise",), steps=(2,))
    result = allinone_cli("run", path, "--workdir", tmp_path / "w", "--address", "127.0.0.1:9")
    assert result.returncode == 2
    assert "127.0.0.1:9" in result.stderr and "Traceback" not in result.stderr


def test_cli_names_a_missing_data_folder_before_writing_anything(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path, "nodata", tasks=("denoise",), steps=(2,))
    path.write_text(
        path.read_text().replace("batch_size: 4}", "batch_size: 4, train_source: ./nowhere}")
    )
    result = allinone_cli("run", path, "--workdir", tmp_path / "w")
    assert result.returncode == 2
    assert "data.train_source" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists(), "no work directory, no mlflow.db, no Ray session"


def test_resume_after_the_driver_is_killed(tmp_path: Path, ray_session) -> None:
    path = write_pipeline(
        tmp_path, "resumable", tasks=("denoise", "dehaze"), steps=(2, 12), checkpoint_every=4
    )
    workdir = tmp_path / "work"
    # Both drivers join the session's cluster, as drivers on a real cluster do: killing one
    # takes its trainer down with it, and the cluster stays up for the next.
    address = ray_session.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "allinone", "run", str(path), "--workdir", str(workdir)]
    command += ["--address", address]
    driver = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for_second_stage_checkpoint(workdir, driver)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    state = json.loads((workdir / "state.json").read_text())
    assert list(state["finished"]) == ["stage1-denoise"]
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage1-denoise: finished earlier, skipped" in resumed.stdout
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resumable").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    stage2 = json.loads((workdir / "state.json").read_text())["stage_runs"]["stage2-dehaze"]
    steps = [m.step for m in client.get_metric_history(stage2, "train/loss")]
    assert sorted(set(steps)) == list(range(1, 13))
    repeated = {s for s in steps if steps.count(s) > 1}
    # A checkpoint at step 4 or later existed when the driver died: nothing before it ran twice.
    assert not repeated or min(repeated) > 4, sorted(steps)


def _wait_for_second_stage_checkpoint(workdir: Path, driver: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the driver ended before it could be killed"
        state_file = workdir / "state.json"
        if (
            state_file.is_file()
            and "stage1-denoise" in json.loads(state_file.read_text())["finished"]
        ):
            # Ray Train counts a checkpoint once its controller has recorded it in the snapshot.
            snapshots = list(
                (workdir / "ray").glob("*stage2-dehaze*/checkpoint_manager_snapshot.json")
            )
            if snapshots and "checkpoint_" in snapshots[0].read_text():
                return
        time.sleep(0.2)
    raise AssertionError("the second stage wrote no checkpoint in time")
