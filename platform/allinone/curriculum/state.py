"""What one run is told (:class:`RunOptions`) and what its work directory remembers
(:class:`RunState`) so that ``--resume`` continues where a killed driver stopped."""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from allinone.base.files import write_atomic
from allinone.config import ConfigError, Pipeline, expand_env
from allinone.data import storage
from allinone.data.storage import StorageError, StoragePath
from allinone.train.job import FaultInjection

STATE = "state.json"
LOCK = "workdir.lock"


class CurriculumError(RuntimeError):
    """A stage that cannot continue; the message says which and why."""


class WorkdirBusy(CurriculumError):
    """Another process holds the work directory."""


_held: dict[Path, int] = {}  # work directory -> descriptor of its locked file, in this process


def hold_workdir(workdir: Path) -> None:
    """Take the work directory for this process, before anything is written in it.

    An OS lock (``flock``) on ``workdir.lock``: the kernel drops it when the process ends, however
    it ends, so a killed run never leaves a stale lock. Holding it again in the same process is a
    no-op (a run then its resume in one Python session). The file names the holder's pid for the
    refusal's message."""
    workdir = workdir.resolve()
    if workdir in _held:
        return
    fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirBusy(
            f"{workdir} is in use by process {holder} (another allinone run or tune); "
            "wait for it to end or choose another --workdir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[workdir] = fd


def release_workdir(workdir: Path) -> None:
    fd = _held.pop(workdir.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock


def _holder(fd: int, wait_s: float = 2.0) -> str:
    """The holder's pid as it wrote it (it writes just after locking: give it a moment)."""
    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text or time.monotonic() > deadline:
            return text or "unknown"
        time.sleep(0.05)


@dataclass(frozen=True)
class RunOptions:
    """How one curriculum runs: where, tracked where, and what a caller (a study) adds."""

    workdir: Path
    tracking_uri: str | None = None
    address: str | None = None
    resume: bool = False
    register: bool = True
    fault: FaultInjection | None = None  # test hook: kill a worker once at a step
    # Shards built beforehand, on disk or in object storage (a study's trials share them).
    shards: StoragePath | None = None
    parent_run_id: str | None = None  # nest the curriculum's MLflow run under this one
    tags: dict[str, str] = field(default_factory=dict)  # set on the curriculum's MLflow run
    train_callbacks: tuple[Any, ...] = ()  # Ray Train callbacks, e.g. Tune's reporting one
    # The curriculum's last scores are the caller's to report (a study's trial reports them once
    # the run has ended, so that a scheduler stopping at its final step cannot cut the end short).
    hold_final_scores: bool = False
    # Ray Train's storage_path (--storage), else train.storage, else <workdir>/ray.
    storage: str | None = None
    # Where the run builds and reads its shards: data.shards, else <workdir>/shards.
    shard_store: str | None = None

    @property
    def shard_root(self) -> StoragePath:
        return storage.path(self.shards or self.shard_store or self.workdir / "shards").resolve()

    @property
    def checkpoint_root(self) -> StoragePath:
        """Where Ray Train keeps the stages' checkpoints, on disk or in object storage."""
        return storage.path(self.storage or self.workdir / "ray").resolve()

    def for_pipeline(self, pipeline: Pipeline) -> RunOptions:
        """These options with the pipeline's storage settings where the caller gave none; each
        store is reached now, before anything is written, or the error names its field."""
        config = pipeline.config
        where = {
            "--storage": self.storage,
            "train.storage": _configured(pipeline, config.train.storage),
            "data.shards": self.shard_store or _configured(pipeline, config.data.shards),
        }
        for name, location in where.items():
            try:
                storage.check(storage.path(location or "."))
            except StorageError as err:
                flag = name.startswith("--")
                origin, field_name = (name, "") if flag else (pipeline.path, name)
                raise ConfigError(origin, field_name, str(err)) from None
        return replace(
            self,
            storage=where["--storage"] or where["train.storage"],
            shard_store=where["data.shards"],
        )


@dataclass
class RunState:
    """What a work directory remembers between driver processes."""

    pipeline: str
    parent_run_id: str | None = None
    stage_runs: dict[str, str] = field(default_factory=dict)  # stage name -> MLflow run id
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> weights, scores
    attempt: str = ""  # suffix of Ray Train run names; a fresh run never picks up old checkpoints
    # Set once the whole run has ended (registered, when it registers): a --resume of it says so
    # and does nothing more.
    completed: dict[str, Any] | None = None  # weights, registered ("name vN") or None

    @classmethod
    def open(cls, workdir: Path, pipeline: Pipeline, resume: bool) -> RunState:
        path = workdir / STATE
        if not path.is_file():
            return cls(pipeline=pipeline.config.name, attempt=os.urandom(4).hex())
        if not resume:
            raise CurriculumError(
                f"{workdir} holds an earlier run of {pipeline.config.name}: "
                "pass --resume to continue it, or choose another --workdir"
            )
        state = cls(**json.loads(path.read_text()))
        if state.pipeline != pipeline.config.name:
            raise CurriculumError(
                f"{path}: belongs to pipeline {state.pipeline!r}, not {pipeline.config.name!r}"
            )
        return state

    def save(self, workdir: Path) -> None:
        write_atomic(workdir / STATE, json.dumps(asdict(self), indent=2))


def _configured(pipeline: Pipeline, value: str | None) -> str | None:
    """A configured location: a URI as it is, a local path relative to the pipeline file."""
    if value is None:
        return None
    value = expand_env(value)
    return value if storage.is_remote(value) else str((pipeline.folder / value).resolve())
