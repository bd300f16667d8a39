"""``allinone submit`` and ``allinone jobs``: the same run on a Ray cluster, via the Ray Jobs API.

A job ships the project root (the folder above the pipeline that holds ``pyproject.toml``) as its
working directory, so the pipeline and its task YAMLs travel with it, and ships the ``allinone``
package it runs with as a ``py_module``: the driver and every worker import the submitted code, also
on nodes where the package is not installed or an older copy is. The driver runs on the head node:
``python -m allinone run <pipeline, relative to the project> --workdir ...``.

Work directory: ``--workdir`` is passed as given; an absolute path on a filesystem that every node
mounts at the same place (NFS, EFS) is what a multi-node cluster needs, because Ray Data tasks read
the shards and Ray Train writes checkpoints there from any node. Without one the job works in
``runs/<job id>`` inside its own working directory on the head node: unique per job, so a second
submission never meets the first one's state, but scratch space that Ray removes with the job's
files. Pass ``--tracking-uri`` of an MLflow server to keep the results.

Paths: the pipeline's data folders are checked where the job will run, by a short check job
with the same runtime environment, before the run is queued; a path that exists only here gets
one line saying how to point the job at the data. Variables the pipeline's YAML files read
(``${ALLINONE_DATA}``...) travel with the job when they are set here and ``--env`` does not set
them.

Address: ``--address``, else ``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS``, else the last address
a ``submit`` or ``jobs`` command reached (kept in ``~/.local/state/allinone/ray-address``).

Authentication: Ray 2.60 clusters require a token (``ray start --head`` writes
``~/.ray/auth_token``). Ray's job client sends it only when ``RAY_AUTH_MODE=token`` is set in the
client's environment; we look for the token where Ray's own loader does (``$RAY_AUTH_TOKEN``, the
file ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) and send it whenever one is found, unless
``RAY_AUTH_MODE=disabled``, the way ``ray.init`` does when it joins an existing cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from allinone.base.errors import first_line
from allinone.base.files import write_atomic
from allinone.base.provenance import COMMIT_VARIABLE, git_commit
from allinone.cluster.ray import WORKER_ENV, unreachable

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

    from allinone.config import Pipeline

# What never needs to travel to the cluster: environments, run outputs, local stores, caches.
# Ray also honours .gitignore and .rayignore; these hold where neither exists (an unpacked sdist).
PROJECT_EXCLUDES = [
    ".venv/",
    "venv/",
    ".git/",
    "runs/",
    "mlruns/",
    "mlartifacts/",
    "*.db",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".ruff_cache/",
    "build/",
    "dist/",
]
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # Ray's CLI reads them in this order
JOB_VARIABLE = "ALLINONE_JOB_ID"  # the job's own id, for its closing block
AGENT_PORT = 52365  # the dashboard agent's HTTP port unless `ray start` was told another
CHECK_TIMEOUT_S = 600.0  # a check job waits for its node's runtime environment like any job

T = TypeVar("T")


class JobError(RuntimeError):
    """A cluster or job that cannot be reached or used; the message names the address."""


# --------------------------------------------------------------------------- connecting
def resolve_address(given: str | None) -> str:
    """The dashboard URL: ``--address``, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``,
    else the last one reached from this machine."""
    address = given or next((os.environ[v] for v in ADDRESS_VARIABLES if os.environ.get(v)), None)
    address = address or _remembered()
    if not address:
        raise JobError(
            "no Ray cluster given: pass --address http://HEAD:8265 (remembered for later "
            "commands) or set RAY_API_SERVER_ADDRESS"
        )
    return address.rstrip("/") if "://" in address else f"http://{address.rstrip('/')}"


def address_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "allinone" / "ray-address"


def _remembered() -> str | None:
    path = address_file()
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def _remember(url: str) -> None:
    # A read-only home only means that the next command needs --address again.
    with contextlib.suppress(OSError):
        write_atomic(address_file(), url + "\n")


def find_token() -> str | None:
    """The cluster's token, from where Ray's own loader looks; None when auth is switched off."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    if named and not path.is_file():
        raise JobError(f"RAY_AUTH_TOKEN_PATH names {path}, which is not a file")
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def connect(address: str | None) -> JobSubmissionClient:
    """A job client for the cluster, or one clear JobError when it does not answer."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    check_listening(url)
    _quiet_ray_client()
    token = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with _address_variables_unset():
            client = JobSubmissionClient(url, headers=headers)
        _remember(url)
        return client
    except AuthenticationError as err:
        raise JobError(_refused(url, err, token is not None)) from None
    except (ConnectionError, RuntimeError, OSError) as err:
        raise JobError(
            f"Ray cluster at {url} does not answer as a Ray dashboard: {first_line(err)}"
        ) from None


def check_listening(url: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds where nothing listens (Ray's client would wait without a timeout)."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)  # as the HTTP client does
    except ValueError:
        raise JobError(f"Ray address {url!r} has no valid port (e.g. http://HEAD:8265)") from None
    if not parts.hostname:
        raise JobError(f"Ray address {url!r} names no host (e.g. http://HEAD:8265)")
    refusal = unreachable(parts.hostname, port, timeout_s)
    if refusal:
        raise JobError(f"Ray cluster at {url} does not answer ({refusal})")


def _quiet_ray_client() -> None:
    # The job client logs each file it leaves out of the upload and each closed log stream at INFO
    # or WARNING; our own lines say what was submitted, and its errors still reach us as exceptions.
    for name in (
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
        "ray._private.runtime_env",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def _address_variables_unset() -> Iterator[None]:
    # Ray's client lets these variables override the address it is given; ours was already chosen.
    saved = {v: os.environ.pop(v) for v in ADDRESS_VARIABLES if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _refused(url: str, err: Exception, sent_token: bool) -> str:
    status = str(getattr(err, "message", err)).splitlines()[0]
    fix = "the token sent is not this cluster's" if sent_token else "no token found here"
    return (
        f"Ray cluster at {url} refused the request ({status}): {fix}; copy ~/.ray/auth_token "
        "from the head node to this machine, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
    )


def _ask(client: JobSubmissionClient, what: str, call: Callable[[], T]) -> T:
    """One Jobs API request; its failure becomes one line naming the cluster."""
    from ray.exceptions import AuthenticationError

    try:
        return call()
    except AuthenticationError as err:
        raise JobError(_refused(client.get_address(), err, True)) from None
    except (ConnectionError, RuntimeError, OSError) as err:
        if "No available agent" in str(err):
            raise JobError(_no_agent(client.get_address())) from None
        raise JobError(f"{what} at {client.get_address()}: {first_line(err)}") from None


def _no_agent(url: str) -> str:
    # The head's dashboard hands each job to the dashboard agent of a node; an agent that could
    # not bind its HTTP port never registers, and the dashboard answers "No available agent".
    return (
        f"Ray cluster at {url} has no dashboard agent to start jobs (Ray: 'No available agent to "
        f"submit job'): the agent on the head node could not start, most often because its HTTP "
        f"port ({AGENT_PORT} unless the head was started with --dashboard-agent-listen-port) is "
        "taken, e.g. by another Ray instance on that machine; free the port, or restart the head "
        "with `ray start --head --dashboard-agent-listen-port=<a free port>`, and submit again"
    )


# --------------------------------------------------------------------------- submitting
def project_root(pipeline_path: Path) -> Path:
    """The folder shipped as the job's working directory: the nearest one with a pyproject.toml."""
    for folder in pipeline_path.resolve().parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    raise JobError(
        f"{pipeline_path}: no pyproject.toml above it, so no project to ship; "
        "keep pipelines inside the project"
    )


def job_entrypoint(
    pipeline: Pipeline, project: Path, workdir: str, tracking_uri: str | None, verb: str = "run"
) -> str:
    """``allinone run`` (or ``tune``) of the shipped pipeline, as the job's driver runs it."""
    shipped = _shipped(pipeline.path, project)
    args = ["python", "-m", "allinone", verb, shipped, "--workdir", workdir]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    return shlex.join(args)


def job_runtime_env(project: Path, env: dict[str, str]) -> dict[str, Any]:
    """Ship the project and the allinone package this command runs with; set the job's variables."""
    import allinone

    return {
        "working_dir": str(project),
        "excludes": PROJECT_EXCLUDES,
        "py_modules": [str(Path(allinone.__file__).parent)],
        "env_vars": {**WORKER_ENV, **env},
    }


def _shipped(path: Path, project: Path) -> str:
    """A path as the job sees it, relative to its working directory."""
    try:
        return path.resolve().relative_to(project).as_posix()
    except ValueError:
        raise JobError(
            f"{path} lies outside the shipped project {project}; "
            "move it inside so that it travels with the job"
        ) from None


@dataclass(frozen=True)
class Submission:
    """What ``allinone submit`` sends: the pipeline, where it works and logs, the job's variables,
    and ``verbose`` for the job's own console."""

    pipeline: Pipeline
    workdir: str | None
    tracking_uri: str | None
    env: dict[str, str]
    verb: str = "run"  # or "tune"
    verbose: bool = False


def submit(
    client: JobSubmissionClient,
    request: Submission,
    exists_here: Callable[[], bool] = lambda: False,
) -> str:
    """Check the pipeline's inputs where the job will run, then submit ``allinone run`` (or
    ``tune``); returns the job's submission id. ``exists_here`` tells, when the check fails,
    whether the same inputs are found on this machine (the CLI checks them)."""
    pipeline = request.pipeline
    project = project_root(pipeline.path)
    for name in pipeline.tasks:
        _shipped(pipeline.task_path(name), project)  # every task file must travel with the job
    job_id = f"allinone-{request.verb}-{pipeline.config.name}-{secrets.token_hex(4)}"
    env = job_env(pipeline, request.env, job_id)
    runtime_env = job_runtime_env(project, env)
    check_where_it_runs(client, pipeline, project, runtime_env, request.env, exists_here)
    entrypoint = job_entrypoint(
        pipeline, project, request.workdir or f"runs/{job_id}", request.tracking_uri, request.verb
    )
    if request.verbose:
        entrypoint += " --verbose"
    return _ask(
        client,
        "submitting",
        lambda: client.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata={"pipeline": _shipped(pipeline.path, project)},
        ),
    )


def job_env(pipeline: Pipeline, given: dict[str, str], job_id: str) -> dict[str, str]:
    """The job's variables: ``--env``, then every variable the pipeline's YAML files read that is
    set here (``ALLINONE_DATA``...), the code's commit and the job's own id."""
    travelling = {
        name: os.environ[name]
        for name in referenced_variables(pipeline)
        if name in os.environ and name not in given
    }
    commit = git_commit()
    return {
        **travelling,
        **({COMMIT_VARIABLE: commit} if commit else {}),
        **given,
        JOB_VARIABLE: job_id,
    }


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def referenced_variables(pipeline: Pipeline) -> list[str]:
    """The ``${VAR}`` names in the pipeline's YAML and its tasks' YAML files, in order."""
    files = [pipeline.path, *(pipeline.task_path(name) for name in pipeline.tasks)]
    names = [n for path in files for n in _VARIABLE.findall(Path(path).read_text())]
    return list(dict.fromkeys(names))


def check_where_it_runs(
    client: JobSubmissionClient,
    pipeline: Pipeline,
    project: Path,
    runtime_env: dict[str, Any],
    given: dict[str, str],
    exists_here: Callable[[], bool],
) -> None:
    """``allinone config check --inputs`` of the pipeline as a short job with the run's own
    runtime environment: its paths resolve exactly as the run's will. A failure raises one
    JobError saying how to point the job at its data."""
    job_id = f"allinone-check-{pipeline.config.name}-{secrets.token_hex(4)}"
    entrypoint = shlex.join(
        [
            "python",
            "-m",
            "allinone",
            "config",
            "check",
            "--inputs",
            _shipped(pipeline.path, project),
        ]
    )
    _ask(
        client,
        "checking the pipeline on the cluster",
        lambda: client.submit_job(
            entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env
        ),
    )
    info = _wait(client, job_id, CHECK_TIMEOUT_S)
    if str(info.status) == "SUCCEEDED":
        return
    said = (info.message or str(info.status)).strip().splitlines() or [str(info.status)]
    problem = _error_line(job_logs(client, job_id)) or said[0]
    raise JobError(_not_there(problem, pipeline, runtime_env["env_vars"], given, exists_here))


def _wait(client: JobSubmissionClient, job_id: str, timeout_s: float) -> JobDetails:
    deadline = time.monotonic() + timeout_s
    while True:
        info = job_info(client, job_id)
        if info.status.is_terminal():
            return info
        if time.monotonic() > deadline:
            _ask(client, f"stopping job {job_id}", lambda: client.stop_job(job_id))
            raise JobError(
                f"the check job {job_id} at {client.get_address()} did not end in "
                f"{timeout_s:.0f} s (allinone jobs logs {job_id} says why); nothing submitted"
            )
        time.sleep(1.0)


def _error_line(logs: str) -> str | None:
    """The one-line error our command line printed (``error: ...``), without the prefix."""
    found = [line for line in logs.splitlines() if line.startswith("error: ")]
    return found[-1].removeprefix("error: ").strip() if found else None


def _not_there(
    problem: str,
    pipeline: Pipeline,
    env: dict[str, str],
    given: dict[str, str],
    exists_here: Callable[[], bool],
) -> str:
    line = f"not submitted: where the job runs, {problem}"
    variables = referenced_variables(pipeline)
    sent = [f"{n}={env[n]}" for n in variables if n in env and n not in given]
    if sent:
        line += f" ({', '.join(sent)} travelled from this shell)"
    if not exists_here():
        return line
    hint = " and ".join(f"--env {n}=/path/on/the/cluster" for n in variables) or (
        "absolute paths that every node mounts in the pipeline"
    )
    return (
        f"{line}. It exists on this machine only: the job gets a copy of the project, not the "
        f"data beside it; put the data where the cluster's nodes read it and pass {hint}"
    )


# --------------------------------------------------------------------------- following
def job_info(client: JobSubmissionClient, job_id: str) -> JobDetails:
    return _ask(client, f"job {job_id}", lambda: client.get_job_info(job_id))


def list_jobs(client: JobSubmissionClient) -> list[JobDetails]:
    jobs = _ask(client, "listing jobs", client.list_jobs)
    return sorted(jobs, key=lambda job: job.start_time or 0)


def job_logs(client: JobSubmissionClient, job_id: str) -> str:
    return _ask(client, f"logs of job {job_id}", lambda: client.get_job_logs(job_id))


def stop_job(client: JobSubmissionClient, job_id: str) -> bool:
    return _ask(client, f"stopping job {job_id}", lambda: client.stop_job(job_id))


def follow(
    client: JobSubmissionClient,
    job_id: str,
    write: Callable[[str], Any] = sys.stdout.write,
    settle_s: float = 30.0,
) -> JobDetails:
    """Stream a job's logs until it ends; returns its final details."""
    job_info(client, job_id)  # an unknown id fails here with one line, not in the log stream

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
            sys.stdout.flush()

    _ask(
        client,
        f"log stream of job {job_id} (it goes on; follow it again with "
        f"`allinone jobs logs {job_id} --follow`)",
        lambda: asyncio.run(tail()),
    )
    # The stream closes as the job ends; its status may take a moment to say so.
    deadline = time.monotonic() + settle_s
    while True:
        info = job_info(client, job_id)
        if info.status.is_terminal() or time.monotonic() > deadline:
            return info
        time.sleep(0.5)
