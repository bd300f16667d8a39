"""Which tracking store and run a verb means when the user does not say.

``allinone run`` and ``tune`` leave ``latest.json`` beside their work folder (``runs/latest.json``
for the default ``runs/<pipeline>``): the run id, the store and the registered model. A later
``eval``, ``restore``, ``report`` or ``register`` in the same folder then needs no
``--tracking-uri``; ``latest`` names that run (``report latest``) or its model (``--model
latest``). Without a pointer, exactly one ``runs/*/mlflow.db`` is as unambiguous; several get one
line naming them and the flag to pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from allinone.base.files import write_atomic

RUNS = Path("runs")  # the default parent of work folders, relative to where commands run
LATEST_FILE = "latest.json"
LATEST = "latest"  # what a user types for the last run (report) or its model (--model)


class StoreError(ValueError):
    """No store, or no single store, to use; the message says which flag to pass."""


@dataclass(frozen=True)
class LatestRun:
    run_id: str
    workdir: str
    tracking_uri: str
    model_uri: str | None  # the registered version, when the run registered one
    pipeline: str


def write_latest(latest: LatestRun) -> Path:
    """Point ``latest.json`` beside the work folder at this run."""
    folder = Path(latest.workdir).parent
    return write_atomic(folder / LATEST_FILE, json.dumps(asdict(latest), indent=2))


def read_latest(runs: Path = RUNS) -> LatestRun | None:
    path = runs / LATEST_FILE
    if not path.is_file():
        return None
    try:
        return LatestRun(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise StoreError(
            f"{path}: not a run pointer ({err}); delete it or pass --tracking-uri"
        ) from None


def tracking_uri(given: str | None, runs: Path = RUNS) -> str | None:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the last run's store here, else
    the only work folder store under ``runs/``; None when there is none at all."""
    if given or os.environ.get("MLFLOW_TRACKING_URI"):
        return given or os.environ["MLFLOW_TRACKING_URI"]
    latest = read_latest(runs)
    if latest is not None:
        return latest.tracking_uri
    stores = sorted(runs.glob("*/mlflow.db"))
    if len(stores) > 1:
        newest = max(stores, key=lambda p: p.stat().st_mtime)
        raise StoreError(
            f"{len(stores)} tracking stores under {runs}/ ({', '.join(map(str, stores))}): "
            f"pass --tracking-uri, e.g. --tracking-uri {store_uri(newest)} (the newest)"
        )
    return store_uri(stores[0]) if stores else None


def tracking_uri_for(given: str | None, model: str | None = None, runs: Path = RUNS) -> str | None:
    """The store a verb uses (:func:`tracking_uri`); one that finds none fails in one line, unless
    it was given a ``model`` that is a file (a checkpoint needs no store)."""
    uri = tracking_uri(given, runs)
    if uri is None and not (model and Path(model).expanduser().exists()):
        raise StoreError(
            f"no tracking store found here (no {runs / LATEST_FILE}, no {runs}/*/mlflow.db, no "
            "$MLFLOW_TRACKING_URI): pass --tracking-uri, e.g. --tracking-uri "
            "sqlite:///runs/quickstart/mlflow.db for the store of `allinone run`'s work folder"
        )
    return uri


def store_uri(database: Path) -> str:
    return f"sqlite:///{database.resolve()}"


def model_ref(ref: str, runs: Path = RUNS) -> str:
    """``latest`` as the last run's registered model (else its run id); anything else as is."""
    if ref != LATEST:
        return ref
    latest = _latest_or_fail(runs)
    return latest.model_uri or latest.run_id


def run_ref(ref: str, runs: Path = RUNS) -> str:
    """``latest`` as the last run's id; anything else as is."""
    return _latest_or_fail(runs).run_id if ref == LATEST else ref


def _latest_or_fail(runs: Path) -> LatestRun:
    latest = read_latest(runs)
    if latest is None:
        raise StoreError(
            f"no {runs / LATEST_FILE} here: 'latest' means the last `allinone run` or `tune` "
            "started from this folder; pass a run id or a models:/ URI instead"
        )
    return latest
