"""Turn what a user calls a model into a ready torch module: ``resolve_model(ref, tracking_uri)``.

``ref`` is one of
- a registry URI: ``models:/allinone@champion``, ``models:/allinone/3`` (or any ``models:/`` or
  ``runs:/`` URI MLflow resolves): only its checkpoint file (``data/model.ckpt``, a card and
  tensors) is downloaded and read, weights-only; nothing of the model is imported or unpickled;
- an MLflow run id: a curriculum's parent run (or one of its stage runs). Its logged model when
  it has one, else the final stage's weights (the stage run's ``checkpoint`` param) built from
  the run's ``config/pipeline.json``;
- a checkpoint: a stage's ``model.pt`` (or its folder). The curriculum writes ``model.json``
  beside every stage's weights, naming the architecture and pipeline, so a bare path works; a
  Ray Train checkpoint inside a work directory borrows the card of a finished stage; our own
  checkpoint file (``models import`` writes these) carries its card inside.

Every weights file is read tensors-only: one that holds any other pickled object (code to run
on load) is refused with one line, and nothing in it runs.

The result is a :class:`ResolvedModel`: the module in eval mode, its ModelSpec (with the task
names it was trained on, its task ids, in order) and the pipeline config (typed, and as the
logged dict) when known.
Anything that does not resolve raises :class:`ResolveError` with one line naming the reference.
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from allinone.base.errors import first_line
from allinone.base.files import write_atomic
from allinone.config import PipelineConfig
from allinone.models.checkpoint import (
    Checkpoint,
    CheckpointError,
    is_checkpoint_file,
    load_checkpoint,
)
from allinone.models.spec import ModelSpec
from allinone.models.weights import read_state_file, state_dict_mismatch

CARD_FILE = "model.json"  # beside a stage's model.pt: which model and pipeline it belongs to
CONFIG_ARTIFACT = "config/pipeline.json"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ResolveError(ValueError):
    """A model reference that does not lead to a loadable model; the message names it."""


class PickledModelError(ResolveError):
    """A logged model in another format than ours (earlier versions logged pickles)."""


@dataclass(frozen=True)
class ResolvedModel:
    module: torch.nn.Module  # in eval mode
    spec: ModelSpec  # what the network is, and its task names
    config: dict[str, Any] | None  # the pipeline config as logged, when known
    source: str  # what was loaded, for messages: a file, a run, a registry version
    run_id: str | None = None  # the MLflow run the model came from, when known

    @property
    def task_names(self) -> tuple[str, ...]:
        """The model's task ids, in curriculum order."""
        return self.spec.task_names

    @property
    def pipeline(self) -> PipelineConfig | None:
        return PipelineConfig.model_validate(self.config) if self.config else None

    def configure_sampling(self, steps: int | None, seed: int | None) -> None:
        """A sampling model's DDIM steps and seed (``--sample-steps``, ``--seed``); refused in
        one line for a model that restores in one pass, where neither means anything."""
        if steps is None and seed is None:
            return
        if not hasattr(self.module, "configure_sampling"):
            raise ResolveError(
                f"{self.source}: {self.spec.name} restores in one pass; --sample-steps and "
                "--seed apply to a sampling model (perceiver)"
            )
        self.module.configure_sampling(steps=steps, seed=seed)

    def checkpoint(self) -> Checkpoint:
        """The card and the weights, to log or save as one self-describing file."""
        provenance = {"source": self.source, "run_id": self.run_id}
        return Checkpoint(self.spec, self.module.training_state_dict(), provenance)


def resolve_model(ref: str, tracking_uri: str | None = None) -> ResolvedModel:
    """Load the model ``ref`` names (see the module docstring for what it may be)."""
    if ref.startswith(("models:/", "runs:/")):
        return _from_uri(ref, tracking_uri)
    path = Path(ref).expanduser()
    if path.exists():
        return from_checkpoint(path)
    if _RUN_ID.match(ref):
        return _from_run(ref, tracking_uri)
    raise ResolveError(f"model {ref!r}: no such file, and not an MLflow run id or a models:/ URI")


# --------------------------------------------------------------------------- checkpoints
def write_model_card(weights: Path, config: PipelineConfig, stage: str | None = None) -> Path:
    """Record beside ``weights`` what they are, so that the bare file can be loaded later."""
    card = {
        "model": config.model_spec.to_json(),
        "stage": stage,
        "pipeline": config.model_dump(mode="json"),
    }
    return write_atomic(weights.parent / CARD_FILE, json.dumps(card, indent=2))


def from_checkpoint(path: Path) -> ResolvedModel:
    weights = path / "model.pt" if path.is_dir() else path
    if not weights.is_file():
        raise ResolveError(f"{path}: no model.pt in this folder")
    if is_checkpoint_file(weights):  # self-describing: `models import` writes these
        return _from_checkpoint_file(weights)
    card_path = _find_card(weights)
    if card_path is None:
        raise ResolveError(
            f"{weights}: no {CARD_FILE} beside it or in its work directory says which model "
            "these weights belong to; pass the run id or a models:/ URI instead"
        )
    try:
        card = json.loads(card_path.read_text())
        config = card["pipeline"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ResolveError(f"{card_path}: not a model card ({err})") from None
    return _build_and_load(config, weights, source=str(weights))


def _from_checkpoint_file(path: Path) -> ResolvedModel:
    return _loaded(_read_checkpoint(path, str(path)), None, str(path))


def _read_checkpoint(path: Path, name: str) -> Checkpoint:
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        raise _unreadable(path, name, err) from None


def _unreadable(path: Path, name: str, err: Exception) -> ResolveError:
    """One line for a weights file that did not load, ``name`` standing for ``path``."""
    if isinstance(err.__cause__ or err.__context__, pickle.UnpicklingError):
        return ResolveError(
            f"{name}: refused: it holds pickled Python objects, not only tensors, and only "
            "tensors are read (nothing in it was run)"
        )
    return ResolveError(first_line(err).replace(str(path), name))


def _loaded(
    checkpoint: Checkpoint, config: dict[str, Any] | None, source: str, run_id: str | None = None
) -> ResolvedModel:
    spec = checkpoint.spec
    try:
        module = spec.build()
    except ValueError as err:
        raise ResolveError(f"{source}: {first_line(err)}") from None
    mismatch = state_dict_mismatch(module, checkpoint.state_dict)
    if mismatch:
        raise ResolveError(f"{source}: does not fit {spec.name} (preset {spec.preset}): {mismatch}")
    module.load_training_state_dict(checkpoint.state_dict)
    return ResolvedModel(module.eval(), spec, config, source, run_id)


def _find_card(weights: Path) -> Path | None:
    beside = weights.parent / CARD_FILE
    if beside.is_file():
        return beside
    # A Ray Train checkpoint (workdir/ray/<run>/checkpoint_N/model.pt): every stage of a work
    # directory shares one architecture, so any finished stage's card describes it.
    for folder in list(weights.resolve().parents)[:4]:
        cards = sorted((folder / "stages").glob(f"*/{CARD_FILE}"))
        if (folder / "state.json").is_file() and cards:
            return cards[0]
    return None


def _build_and_load(
    config: dict[str, Any], weights: Path, source: str, run_id: str | None = None
) -> ResolvedModel:
    pipeline = PipelineConfig.model_validate(config)
    spec = pipeline.model_spec
    try:
        module = spec.build()
        state = read_state_file(weights, spec.name)
    except (ValueError, FileNotFoundError) as err:
        raise _unreadable(weights, str(weights), err) from None
    mismatch = state_dict_mismatch(module, state)
    if mismatch:
        raise ResolveError(
            f"{weights}: not weights of {spec.name} (preset {spec.preset}): {mismatch}"
        )
    module.load_training_state_dict(state)
    return ResolvedModel(module.eval(), spec, config, source, run_id)


# --------------------------------------------------------------------------- MLflow
def _client(tracking_uri: str | None):
    import mlflow
    from mlflow import MlflowClient

    _check_store_exists(tracking_uri or mlflow.get_tracking_uri())
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # load_model and artifact downloads use it too
    return MlflowClient(tracking_uri)


def _check_store_exists(uri: str) -> None:
    """Refuse a SQLite store that is not there: MLflow would create an empty database (a stray
    file, and a confusing "not found" after it) where the user mistyped a path."""
    if not uri.startswith("sqlite:///"):
        return
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if path and path != ":memory:" and not Path(path).is_file():
        raise ResolveError(f"tracking store {path} does not exist (from {uri}); nothing created")


def _from_uri(uri: str, tracking_uri: str | None) -> ResolvedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    _client(tracking_uri)
    where = tracking_uri or mlflow.get_tracking_uri()
    try:
        info = mlflow.models.get_model_info(uri)
        checkpoint = _registered_checkpoint(uri, info)
    except MlflowException as err:
        raise ResolveError(f"model {uri} does not resolve in {where}: {first_line(err)}") from None
    except OSError as err:
        raise ResolveError(f"model {uri} could not be read from {where}: {err}") from None
    config = (info.metadata or {}).get("pipeline") or _run_config(info.run_id)
    return _loaded(checkpoint, config, uri, info.run_id)


def _registered_checkpoint(uri: str, info) -> Checkpoint:
    """The checkpoint file of a model logged by :mod:`allinone.tracking.registry`, downloaded
    alone and read weights-only; any other kind of model is refused before it is downloaded."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from allinone.tracking import serving

    pyfunc = info.flavors.get("python_function", {})
    if pyfunc.get("loader_module") != serving.__name__ or pyfunc.get("data") != serving.WEIGHTS:
        raise PickledModelError(
            f"model {uri} is not stored as an allinone checkpoint (flavors: "
            f"{', '.join(info.flavors)}); a pickled model runs code when loaded and is not "
            f"loaded here: register its run again (allinone register --run-id {info.run_id})"
        )
    with tempfile.TemporaryDirectory() as folder:
        local = Path(get_artifact_repository(uri).download_artifacts(serving.WEIGHTS, folder))
        return _read_checkpoint(local, f"model {uri} ({serving.WEIGHTS})")


def _from_run(run_id: str, tracking_uri: str | None) -> ResolvedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    where = tracking_uri or mlflow.get_tracking_uri()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ResolveError(f"run {run_id} not found in {where}") from None
    logged = logged_model_uri(run)
    if logged:
        try:
            return _from_uri(logged, tracking_uri)
        except PickledModelError:
            pass  # logged by an earlier version: the stage weights below are read instead
    weights = final_weights(client, run)
    config = _run_config(run.data.tags.get("mlflow.parentRunId") or run_id) or _run_config(run_id)
    if weights is None or config is None:
        raise ResolveError(
            f"run {run_id} ({where}) has no logged model of ours and no finished stage with "
            "weights and config/pipeline.json"
        )
    if not weights.is_file():
        raise ResolveError(f"run {run_id}: its final weights {weights} are not on this machine")
    return _build_and_load(config, weights, source=f"run {run_id}", run_id=run_id)


def logged_model_uri(run) -> str | None:
    """The newest model logged in ``run`` (``models:/<model id>``), if any."""
    import mlflow

    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        output_format="list",
    )
    return f"models:/{found[0].model_id}" if found else None


def final_weights(client, run) -> Path | None:
    """A stage run's ``checkpoint`` param, or for a parent run that of its last stage."""
    if "checkpoint" in run.data.params:
        return Path(run.data.params["checkpoint"])
    stages = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
    )
    finished = [s for s in stages if "checkpoint" in s.data.params]
    if not finished:
        return None
    last = max(finished, key=lambda s: int(s.data.params.get("stage.index", 0)))
    return Path(last.data.params["checkpoint"])


def _run_config(run_id: str | None) -> dict[str, Any] | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{CONFIG_ARTIFACT}")
    except (MlflowException, OSError):
        return None
