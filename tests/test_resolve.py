"""Model references: a run id, a checkpoint path and a registry URI all load the same model, and
none of them runs code hidden in a weights file.

``record_run`` writes what ``allinone run`` leaves behind (work directory, stage weights with their
card, MLflow parent and stage runs, metrics, grids) for a tiny model fine-tuned for a few steps
in-process, so the tests of resolve, registry, restore and report need no Ray training.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from allinone.config import Pipeline, load_pipeline, resolve_source
from allinone.curriculum.plan import plan_stages
from allinone.curriculum.run import _final_scores, _log_config
from allinone.curriculum.scoring import score_stage
from allinone.curriculum.shards import _split_source
from allinone.data.shards import BuildRequest, build_shards, shard_folder
from allinone.evaluate import scoring as evaluate
from allinone.evaluate.continual import log_continual
from allinone.tracking import runs as tracking
from allinone.tracking.registry import log_and_register
from allinone.tracking.resolve import ResolveError, resolve_model, write_model_card
from conftest import TEST_SETS, allinone_cli
from test_curriculum import write_pipeline

PHOTO = TEST_SETS / "CBSD68" / "101085.png"


@dataclass(frozen=True)
class RecordedRun:
    pipeline: Pipeline
    workdir: Path
    uri: str
    parent_id: str
    stage_ids: dict[str, str]
    weights: Path  # the last stage's model.pt
    summary: dict


def record_run(folder: Path, name: str, tasks=("denoise",), steps: int = 3) -> RecordedRun:
    pipeline = load_pipeline(write_pipeline(folder, name, tasks=tasks, steps=(steps,) * len(tasks)))
    workdir, uri = folder / "work", tracking.default_tracking_uri(folder / "work")
    _build_test_shards(pipeline, workdir)
    torch.manual_seed(0)
    model = pipeline.config.model_spec.build()
    # Artifacts beside the store, not in ./mlruns of whatever folder the tests run from.
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment(name, artifact_location=(workdir / "artifacts").as_uri())
    experiment = tracking.connect(uri, name)
    matrix, stage_ids = {}, {}
    with tracking.run(None, experiment, name) as parent_id:
        _log_config(pipeline)
        for stage in plan_stages(pipeline):
            with tracking.run(None, experiment, stage.name, nested=True) as stage_id:
                weights = _fine_tune(model, pipeline, workdir, stage)
                write_model_card(weights, pipeline.config, stage.name)
                mlflow.log_params(
                    {
                        "stage.index": stage.index,
                        "stage.tasks": ",".join(stage.tasks),
                        "checkpoint": str(weights),
                    }
                )
                scores = score_stage(pipeline, workdir / "shards", weights, [stage_id, parent_id])
                for task, score in scores.items():
                    mlflow.log_metrics(score.as_metrics(f"test/{task}"))
            matrix[stage.name] = {task: score.psnr for task, score in scores.items()}
            stage_ids[stage.name] = stage_id
        summary = {"matrix": matrix, "final": _final_scores(matrix)}
        mlflow.log_metrics(summary["final"])
        log_continual(matrix, [s.tasks for s in plan_stages(pipeline)], pipeline.config.tasks)
        tracking.log_json(summary, "results/summary.json")
    return RecordedRun(pipeline, workdir, uri, parent_id, stage_ids, weights, summary)


def _build_test_shards(pipeline: Pipeline, workdir: Path) -> None:
    for task in pipeline.config.tasks:
        source, origin, field = _split_source(pipeline, task, "test")
        where = resolve_source(source, origin.parent, origin, field)
        out = shard_folder(workdir / "shards", task, "test")
        build_shards(BuildRequest(pipeline.tasks[task], "test", str(where), out, 16))


def _fine_tune(model, pipeline: Pipeline, workdir: Path, stage) -> Path:
    """A few real Adam steps on 48 px crops of the stage's pairs, logging ``train/loss``."""
    pairs = [
        p
        for t in stage.tasks
        for p in evaluate.test_pairs(shard_folder(workdir / "shards", t, "test"), t, 2)
    ]
    lq = torch.stack([torch.from_numpy(p[1][:48, :48]).permute(2, 0, 1) for p in pairs])
    gt = torch.stack([torch.from_numpy(p[2][:48, :48]).permute(2, 0, 1) for p in pairs])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(1, stage.steps + 1):
        loss = torch.nn.functional.l1_loss(model(lq), gt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mlflow.log_metric("train/loss", loss.item(), step=step)
    model.eval()
    weights = workdir / "stages" / stage.name / "model.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    return weights


class _Payload:
    """Unpickling it would create ``marker``: a stand-in for code hidden in a weights file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def write_crafted_pickle(path: Path, marker: Path) -> Path:
    """A torch file whose loading with ``weights_only=False`` creates ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"weight": _Payload(marker)}}, path)
    return path


def test_the_crafted_pickle_runs_when_unpickled(tmp_path) -> None:
    # The control for every refusal test: the payload is live, so its marker's absence counts.
    marker = tmp_path / "pwned"
    torch.load(write_crafted_pickle(tmp_path / "model.pt", marker), weights_only=False)
    assert marker.exists()


def assert_refused_unrun(result, marker: Path, says: str) -> None:
    """The command exited 2 with one line saying ``says``, and the payload did not run."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert says in result.stderr and not marker.exists()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> RecordedRun:
    return record_run(tmp_path_factory.mktemp("resolve"), "resolve", tasks=("denoise", "dehaze"))


def _output(module: torch.nn.Module) -> np.ndarray:
    torch.manual_seed(1)
    with torch.no_grad():
        return module(torch.rand(1, 3, 40, 56)).numpy()


def _reference(recorded: RecordedRun) -> np.ndarray:
    model = recorded.pipeline.config.model_spec.build()
    model.load_state_dict(torch.load(recorded.weights, weights_only=True))
    return _output(model.eval())


def test_a_run_id_loads_the_last_stage_weights(recorded) -> None:
    resolved = resolve_model(recorded.parent_id, recorded.uri)
    assert resolved.task_names == ("denoise", "dehaze")
    assert resolved.pipeline.name == "resolve" and not resolved.module.training
    np.testing.assert_array_equal(_output(resolved.module), _reference(recorded))
    stage = resolve_model(recorded.stage_ids["stage1-denoise"], recorded.uri)
    assert stage.config == resolved.config
    assert not np.array_equal(_output(stage.module), _output(resolved.module))


def test_a_bare_checkpoint_path_or_its_folder_loads(recorded, tmp_path) -> None:
    for ref in (recorded.weights, recorded.weights.parent):
        resolved = resolve_model(str(ref))
        assert resolved.task_names == ("denoise", "dehaze")
        np.testing.assert_array_equal(_output(resolved.module), _reference(recorded))
    # A Ray Train checkpoint inside the work directory has no card of its own.
    ray_checkpoint = recorded.workdir / "ray" / "resolve-x" / "checkpoint_000001" / "model.pt"
    ray_checkpoint.parent.mkdir(parents=True)
    shutil.copy(recorded.weights, ray_checkpoint)
    (recorded.workdir / "state.json").write_text("{}")
    np.testing.assert_array_equal(
        _output(resolve_model(str(ray_checkpoint)).module), _reference(recorded)
    )
    lonely = tmp_path / "model.pt"
    shutil.copy(recorded.weights, lonely)
    with pytest.raises(ResolveError, match="no model.json"):
        resolve_model(str(lonely))


def test_a_registry_uri_loads_with_its_config(recorded) -> None:
    with mlflow.start_run(run_id=recorded.parent_id):
        registered = log_and_register(
            resolve_model(str(recorded.weights)).checkpoint(),
            "resolve-test",
            recorded.summary["final"],
            "all-in-one:denoise,dehaze",
            recorded.summary["final"]["final/average_psnr"],
            config=recorded.pipeline.config,
        )
    for uri in ("models:/resolve-test@champion", f"models:/resolve-test/{registered.version}"):
        resolved = resolve_model(uri, recorded.uri)
        assert resolved.task_names == ("denoise", "dehaze")
        assert resolved.pipeline.model.name == "promptir"
        np.testing.assert_array_equal(_output(resolved.module), _reference(recorded))
    # Once a model is logged in the run, its run id resolves to that model.
    assert resolve_model(recorded.parent_id, recorded.uri).source.startswith("models:/")


def test_references_that_do_not_resolve(recorded, tmp_path) -> None:
    with pytest.raises(ResolveError, match=r"models:/nothing@champion does not resolve"):
        resolve_model("models:/nothing@champion", recorded.uri)
    with pytest.raises(ResolveError, match="no such file"):
        resolve_model(str(tmp_path / "missing.pt"))
    with pytest.raises(ResolveError, match="run 0{32} not found"):
        resolve_model("0" * 32, recorded.uri)


def test_a_crafted_pickle_as_a_checkpoint_is_refused_unrun(recorded, tmp_path) -> None:
    marker = tmp_path / "pwned"
    stage = tmp_path / "stages" / "stage1"
    write_crafted_pickle(stage / "model.pt", marker)
    shutil.copy(recorded.weights.parent / "model.json", stage / "model.json")
    with pytest.raises(ResolveError, match="refused: it holds pickled Python objects"):
        resolve_model(str(stage / "model.pt"))
    restore = allinone_cli("restore", PHOTO, "--model", stage / "model.pt", "--out", tmp_path / "o")
    assert_refused_unrun(restore, marker, f"{stage / 'model.pt'}: refused")
    scored = allinone_cli("eval", "--model", stage, "--data", TEST_SETS, "--max-images", "1")
    assert_refused_unrun(scored, marker, f"{stage / 'model.pt'}: refused")
    # Without a card the file is still only read tensors-only (to see whether it is ours).
    bare = write_crafted_pickle(tmp_path / "bare.pt", marker)
    restore = allinone_cli("restore", PHOTO, "--model", bare, "--out", tmp_path / "o")
    assert_refused_unrun(restore, marker, "no model.json")


def test_a_checkpoint_of_another_architecture(recorded, tmp_path) -> None:
    stage = tmp_path / "stages" / "stage1"
    stage.mkdir(parents=True)
    shutil.copy(recorded.weights.parent / "model.json", stage / "model.json")
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 3, 3))
    torch.save(other.state_dict(), stage / "model.pt")
    with pytest.raises(ResolveError) as caught:
        resolve_model(str(stage / "model.pt"))
    message = str(caught.value)
    assert "not weights of promptir (preset tiny)" in message and "\n" not in message
    assert "unexpected keys: 0.weight, 0.bias" in message and "missing keys" in message


def test_a_sqlite_store_that_does_not_exist_is_named_not_created(tmp_path) -> None:
    store = tmp_path / "typo" / "mlflow.db"
    store.parent.mkdir()
    for ref in ("models:/allinone@champion", "0" * 32):
        with pytest.raises(ResolveError) as caught:
            resolve_model(ref, f"sqlite:///{store}")
        message = str(caught.value)
        assert f"tracking store {store} does not exist" in message and "\n" not in message
    assert list(store.parent.iterdir()) == [], "resolving must not create a database"
