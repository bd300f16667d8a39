"""Which code ran: the git commit of the project this package is imported from."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

COMMIT_VARIABLE = "ALLINONE_GIT_COMMIT"  # a submitted job's commit, from the submitting machine
PROJECT = Path(__file__).resolve().parents[3]  # platform/allinone/base/ -> the project root


def git_commit(project: Path = PROJECT) -> str | None:
    """The commit of the code that runs, with ``+ changes`` when tracked files differ from it;
    ``$ALLINONE_GIT_COMMIT`` first (a job's shipped copy has no repository, so ``allinone
    submit`` passes the submitter's); None outside a repository."""
    if os.environ.get(COMMIT_VARIABLE):
        return os.environ[COMMIT_VARIABLE]
    commit = _git(project, "rev-parse", "HEAD")
    if not commit:
        return None
    changed = _git(project, "status", "--porcelain", "--untracked-files=no")
    return f"{commit} + changes" if changed else commit


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
