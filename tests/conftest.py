"""Shared fixtures: the real data beside the repository, and one Ray session for the whole run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Before torch is imported anywhere: idle OpenMP threads must sleep, not spin. Tests share 2 cores
# with Ray's processes, and spinning threads slow every model 5-20x there (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CLEAN_PHOTOS = SHARED_DATA / "train" / "CSun_Hays80"
TEST_SETS = SHARED_DATA / "test"


def allinone_cli(
    *args: object, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """The command line as a user runs it: a fresh process, its output captured as text."""
    command = [sys.executable, "-m", "allinone", *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def pytest_configure(config: pytest.Config) -> None:
    # Ray, MLflow and DeepSpeed are chatty and slow to start when they probe for GPUs and telemetry.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not SHARED_DATA.is_dir():
        raise pytest.UsageError(f"the test data is missing: {SHARED_DATA} (see ../shared/data)")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster shared by every test that needs Ray (starting one costs seconds)."""
    import ray

    from allinone.curriculum.run import start_ray

    start_ray(None)
    yield ray
    ray.shutdown()
