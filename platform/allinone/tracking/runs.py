"""MLflow: one parent run per curriculum, a nested run per stage, and clear failures.

The default store is SQLite in the work directory (the model registry needs a database store);
``--tracking-uri http://...`` points at a real ``mlflow server``. A server that does not answer is
found before any work starts, with one message, instead of after an hour of training.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from allinone.base.errors import first_line


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI."""


def default_tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def connect(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri``, check it answers, and return the experiment id."""
    if uri.startswith(("http://", "https://")):
        # Fail in seconds, not after MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
        if found:
            return found.experiment_id
        return mlflow.create_experiment(experiment, artifact_location=artifact_location(uri))
    except Exception as err:  # every transport and store error means the same to a user
        raise TrackingError(f"tracking store {uri} does not answer: {first_line(err)}") from None


def artifact_location(uri: str) -> str | None:
    """Beside a SQLite store, so a work directory holds its runs' artifacts too (MLflow's own
    default is ``./mlruns`` of whatever folder the command happens to run in). A server keeps
    its artifacts where it was told to."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


@contextmanager
def run(
    run_id: str | None,
    experiment_id: str,
    name: str,
    nested: bool = False,
    parent_id: str | None = None,
) -> Iterator[str]:
    """Start (or reopen, when resuming) a run; ``nested`` under the active run, or under
    ``parent_id`` (a run of another process, e.g. a study's). It ends FINISHED only when the body
    completes; an exception, Ctrl-C included, marks it FAILED / KILLED."""
    active = mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=name,
        nested=nested,
        parent_run_id=None if run_id else parent_id,
    )
    try:
        yield active.info.run_id
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_json(data: Any, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(artifact_file).name
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        mlflow.log_artifact(
            str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None
        )


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "0.0002", ...}`` for ``mlflow.log_params``."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = (
                json.dumps(value, default=str)[:6000] if not isinstance(value, str) else value
            )
    return flat
