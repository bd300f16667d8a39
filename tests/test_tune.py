"""Ray Tune studies: a bad tune: block is refused before any trial; a real study on the session's
Ray cluster searches, stops weak trials, tracks, registers, and resumes without repeating work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from allinone.config import ConfigError, load_pipeline
from allinone.tune.study import apply_values, decode, plan_resources
from conftest import REPO, allinone_cli

STUDY = """
name: {name}
tasks_dir: {tasks}
tasks: [denoise, dehaze]
data: {{samples_per_shard: 16, crop: 32, batch_size: 4}}
model: {{name: promptir, preset: tiny}}
curriculum: {{mode: mixed, steps: [8]}}
train: {{lr: 1.0e-3, zero_stage: 2, log_every: 4}}
eval: {{max_images: 1}}
tune:
  num_samples: {samples}
  max_concurrent: 1
  eval_every: 2
  asha: {{grace_steps: {grace}, reduction_factor: 2}}
{extra}  space:
    train.lr: {{loguniform: [1.0e-4, 3.0e-3]}}
    model.prompt_dims: {{choice: [[8, 16, 32], [16, 32, 64]]}}
{space}"""


def write_study(
    folder: Path, name: str, samples: int = 3, extra: str = "", space: str = "", grace: int = 2
) -> Path:
    path = folder / f"{name}.yaml"
    fields = {"tasks": REPO / "tasks", "samples": samples, "grace": grace}
    path.write_text(STUDY.format(name=name, extra=extra, space=space, **fields))
    return path


# --------------------------------------------------------------------------- refused up front
BAD_STUDIES = {
    "path naming no field": ("", "    train.lrr: {uniform: [0.1, 0.2]}\n", "tune.space.train.lrr"),
    "unknown model argument": (
        "",
        "    model.promt_len: {choice: [3, 5]}\n",
        "tune.space.model.promt_len",
    ),
    "field that changes the shards": (
        "",
        "    data.samples_per_shard: {choice: [8, 16]}\n",
        "tune.space.data.samples_per_shard",
    ),
    "inverted range": ("", "    train.min_lr: {uniform: [0.1, 0.01]}\n", "inverted"),
    "empty choice": ("", "    model.prompt_len: {choice: []}\n", "tune.space.model.prompt_len"),
    "value the field refuses": (
        "",
        "    train.warmup_steps: {randint: [-5, 5]}\n",
        "tune.space.train.warmup_steps",
    ),
    "stage that does not exist": (
        "",
        "    curriculum.steps.3: {randint: [4, 8]}\n",
        "no item 3",
    ),
    "two domains at once": (
        "",
        "    train.min_lr: {uniform: [0.1, 0.2], loguniform: [0.1, 0.2]}\n",
        "exactly one",
    ),
    "metric no suite reports": ("  metric: all-in-one/derain/psnr\n", "", "tune.metric"),
    "few-shot metric": ("  metric: few-shot-k5/average_psnr\n", "", "few-shot scores exist only"),
}


@pytest.mark.parametrize("case", BAD_STUDIES, ids=list(BAD_STUDIES))
def test_a_bad_tune_block_is_refused_naming_the_field(tmp_path: Path, case: str) -> None:
    extra, space, expected = BAD_STUDIES[case]
    path = write_study(tmp_path, "bad", extra=extra, space=space)
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    assert str(path) in message and expected in message, message
    assert "\n" not in message


def test_a_first_rung_beyond_the_curriculum_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tune.asha.grace_steps"):
        load_pipeline(write_study(tmp_path, "late", grace=8))


def test_the_cli_refuses_a_bad_study_in_one_line(tmp_path: Path) -> None:
    path = write_study(tmp_path, "bad", space="    train.lrr: {uniform: [0.1, 0.2]}\n")
    result = allinone_cli("tune", path, "--workdir", tmp_path / "w", timeout=120)
    assert result.returncode == 2
    assert "tune.space.train.lrr" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists(), "nothing is created for a refused study"


def test_trial_values_reach_the_fields_they_name(tmp_path: Path) -> None:
    pipeline = load_pipeline(write_study(tmp_path, "values"))
    # Choices travel to Optuna as JSON text (its categories must be scalars).
    values = decode({"train.lr": 0.002, "model.prompt_dims": "[16, 32, 64]"}, pipeline.config.tune)
    assert values == {"train.lr": 0.002, "model.prompt_dims": [16, 32, 64]}
    changed = apply_values(
        pipeline.config,
        {**values, "curriculum.steps.0": 5, "train.aux_weights.ortho": 0.1},
        pipeline.path,
    )
    assert changed.train.lr == 0.002 and changed.model.overrides["prompt_dims"] == [16, 32, 64]
    assert changed.curriculum.steps == [5] and changed.train.aux_weights == {"ortho": 0.1}
    assert pipeline.config.train.lr == 1.0e-3, "the base pipeline is left as it was"


def test_concurrent_trials_are_derived_from_the_cluster(tmp_path: Path) -> None:
    config = load_pipeline(write_study(tmp_path, "res", samples=16)).config
    unlimited = config.model_copy(
        update={"tune": config.tune.model_copy(update={"max_concurrent": None})}
    )
    # Each trial: its driver's token share, one worker, one CPU for its data readers.
    assert plan_resources(unlimited, {"CPU": 4}, local=False).concurrent == 1
    assert plan_resources(unlimited, {"CPU": 64}, local=False).concurrent == 4, "TPE: 16 / 4"
    random = unlimited.model_copy(
        update={"tune": unlimited.tune.model_copy(update={"search": "random"})}
    )
    assert plan_resources(random, {"CPU": 64}, local=False).concurrent == 30
    local = plan_resources(unlimited, {"CPU": 4}, local=True)
    assert local.threads_per_worker == max(1, os.cpu_count() or 1)
    with pytest.raises(Exception, match="cannot hold one trial"):
        plan_resources(unlimited, {"CPU": 1.5}, local=False)


# --------------------------------------------------------------------------- a real study
def tune_command(path: Path, workdir: Path, address: str) -> list[str]:
    command = [sys.executable, "-m", "allinone", "tune", str(path), "--workdir", str(workdir)]
    return [*command, "--address", address]


def trial_runs(workdir: Path, name: str) -> list:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    return [r for r in runs if "allinone.trial" in r.data.tags]


def _wait_for_a_finished_trial(workdir: Path, driver: subprocess.Popen) -> str:
    """A trial's id once Tune's saved experiment state records it TERMINATED."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the study ended before it could be interrupted"
        finished = [t for t, status in saved_trials(workdir).items() if status == "TERMINATED"]
        if finished:
            return finished[0]
        time.sleep(0.5)
    raise AssertionError("no trial finished in time")


def saved_trials(workdir: Path) -> dict[str, str]:
    """Trial id -> status, as Tune last saved its experiment state (for Tuner.restore)."""
    for state in (workdir / "tune" / "study").glob("experiment_state*.json"):
        try:
            entries = json.loads(state.read_text())["trial_data"]
        except (json.JSONDecodeError, KeyError):
            return {}  # being written
        return {t["trial_id"]: t["status"] for t in (json.loads(e[0]) for e in entries)}
    return {}


@pytest.fixture(scope="module")
def interrupted_study(tmp_path_factory, ray_session):
    """A 2-trial random search killed after its first trial ended, then resumed with --resume.
    (Optuna's TPE runs in test_cluster's submitted study.)"""
    folder = tmp_path_factory.mktemp("study")
    path = write_study(folder, "study", samples=2, extra="  search: random\n")
    workdir = folder / "work"
    # The drivers join the session's cluster, as on a real cluster: killing one takes its
    # trials down with it, and the cluster stays up for the resumed study.
    command = tune_command(path, workdir, ray_session.get_runtime_context().gcs_address)
    driver = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        first = _wait_for_a_finished_trial(workdir, driver)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    runs_before = {
        r.info.run_id
        for r in trial_runs(workdir, "study")
        if r.data.tags["allinone.trial"] == first
    }
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return workdir, first, runs_before, resumed.stdout


def test_a_resumed_study_does_not_repeat_a_finished_trial(interrupted_study) -> None:
    workdir, first, runs_before, _ = interrupted_study
    runs = trial_runs(workdir, "study")
    assert {r.info.run_id for r in runs if r.data.tags["allinone.trial"] == first} == runs_before
    assert len({r.data.tags["allinone.trial"] for r in runs}) == 2, "every trial ran once"


def test_random_search_keeps_to_max_concurrent(interrupted_study) -> None:
    """max_concurrent: 1 means the second trial starts only once the first has ended (random
    search limits itself: Tune ignores max_concurrent_trials for it)."""
    workdir, first, _, _ = interrupted_study
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("study").experiment_id])
    trials = [r for r in runs if "allinone.trial" in r.data.tags]
    first_ids = {r.info.run_id for r in trials if r.data.tags["allinone.trial"] == first}
    # The first trial's stage runs (a trial's own run is reopened at the end: its registration).
    first_trained = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in first_ids]
    later = [r for r in trials if r.info.run_id not in first_ids]
    assert first_trained and later
    assert min(r.info.start_time for r in later) >= max(r.info.end_time for r in first_trained)


def test_the_study_prints_its_table_and_registers_the_best(interrupted_study) -> None:
    workdir, _, _, stdout = interrupted_study
    assert "2 trials" in stdout and "status" in stdout
    assert "completed" in stdout
    assert "registered allinone v" in stdout
    best = json.loads((workdir / "mlartifacts").rglob("trials.json").__next__().read_text())
    assert len(best) == 2 and {row["status"] for row in best} <= {"completed", "stopped by ASHA"}


def test_mlflow_holds_the_study_and_a_child_run_per_trial(interrupted_study) -> None:
    workdir, _, _, _ = interrupted_study
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("study")
    runs = client.search_runs([experiment.experiment_id])
    studies = [r for r in runs if r.info.run_name == "study-study"]
    assert len(studies) == 1 and studies[0].info.status == "FINISHED"
    study = studies[0]
    assert study.data.metrics["study/trials"] == 2
    artifacts = {a.path for a in client.list_artifacts(study.info.run_id, "tune")}
    assert {"tune/trials.md", "tune/trials.json", "tune/params_vs_metric.png"} <= artifacts
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study.info.run_id]
    assert len(trials) == 2
    steps_run = 0
    for trial in trials:
        # Its searched values as params, and the curve ASHA read, in curriculum steps.
        assert "train.lr" in trial.data.params and "model.prompt_dims" in trial.data.params
        curve = client.get_metric_history(trial.info.run_id, "val/all-in-one/average_psnr")
        assert curve and all(5 < m.value < 60 for m in curve)
        steps_run += max(m.step for m in curve)
        assert trial.info.status in ("FINISHED", "KILLED")
    # What Tune counted is what the trials logged: at most 2 full curricula of 8 steps.
    assert study.data.metrics["study/trial_steps"] == steps_run <= 2 * 8
    versions = client.search_model_versions("name='allinone'")
    best = study.data.tags["allinone.best_trial"]
    best_run = next(r for r in trials if r.data.tags["allinone.trial"] == best)
    assert best_run.info.status == "FINISHED"
    assert any(v.run_id == best_run.info.run_id for v in versions)
