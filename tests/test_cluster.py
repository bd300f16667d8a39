"""``allinone submit`` and ``allinone jobs`` against a real two-node Ray cluster with token
authentication and a real MLflow server, both started here on 127.0.0.1.

The cluster has its own --temp-dir, ports and token file, so it neither meets the suite's local Ray
(``ray_session``) nor is found by another test's ``ray.init()``; everything started here is stopped
by its own process ids, never with ``ray stop`` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from conftest import REPO, SHARED_DATA
from test_readme import readme_command

VENV_BIN = Path(sys.executable).parent
SUBMIT_TIMEOUT_S = 420


@dataclass
class Services:
    dashboard: str  # http://127.0.0.1:PORT of the Ray head
    tracking_uri: str  # http://127.0.0.1:PORT of the MLflow server
    artifacts: Path  # where the MLflow server stores what clients upload
    client_env: dict[str, str]  # what a user's shell holds: the token file, no Ray address


# --------------------------------------------------------------------------- starting and stopping
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(token_file: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH"))
    }
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # a node's `python` is this venv's
        RAY_AUTH_TOKEN_PATH=str(token_file),  # this cluster's own token, not ~/.ray/auth_token
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # a SIGTERMed node stops at once
        OMP_WAIT_POLICY="PASSIVE",
    )
    return env


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # A session of its own: Ctrl-C in the terminal reaches pytest, and teardown reaches these.
    with log.open("w") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def ray_node(temp_dir: Path, head: bool, ports: dict[str, int], cpus: int) -> list[str]:
    """``ray start --block``: the command stays in the foreground and, on SIGTERM, stops every
    process of its node (Ray's own shutdown hook), which makes the node stoppable by one pid.

    Each node needs a temp dir of its own, as on separate machines: sharing one, a node's
    runtime-env agent deletes the job's unpacked working dir that the other node still runs in,
    and both log monitors forward every worker line, so the driver prints each twice."""
    common = [
        str(VENV_BIN / "ray"),
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={cpus}",
        "--object-store-memory=300000000",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    if head:
        return [
            *common,
            "--head",
            f"--port={ports['gcs']}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports['dashboard']}",
            f"--ray-client-server-port={ports['client']}",
        ]
    return [*common, f"--address=127.0.0.1:{ports['gcs']}", '--resources={"worker_node": 1}']


def stop_all(processes: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM the processes we started, then SIGKILL whatever of their trees outlived the grace."""
    trees = [member for process in processes for member in process_tree(process.pid)]
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(trees, timeout=grace_s)
    for leftover in alive:
        leftover.kill()
    psutil.wait_procs(alive, timeout=10)
    for process in processes:
        process.wait(timeout=10)


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def get_json(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def wait_until(
    ready, what: str, processes: list[subprocess.Popen], timeout_s: float, logs: list[Path]
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(1)
    tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    raise RuntimeError(f"{what} did not come up in {timeout_s:.0f} s\n{tails}")


def listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def alive_nodes(dashboard: str, token: str) -> int:
    nodes = get_json(f"{dashboard}/api/v0/nodes?limit=10", token)["data"]["result"]["result"]
    return sum(node["state"] == "ALIVE" for node in nodes)


def mlflow_answers(uri: str) -> bool:
    with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
        return response.status == 200


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    # Short path: Ray's unix sockets live under --temp-dir and sockets allow about 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="aio-", dir="/tmp"))
    token_file = root / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    env = base_env(token_file)
    ports = {"gcs": free_port(), "dashboard": free_port(), "client": free_port()}
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    tracking_uri = f"http://127.0.0.1:{free_port()}"
    logs = {name: root / f"{name}.log" for name in ("head", "worker", "mlflow")}
    started: list[subprocess.Popen] = []
    try:
        head_env = {**env, "RAY_AUTH_MODE": "token"}  # authentication on, as `ray start` defaults
        started.append(start(ray_node(root / "head", True, ports, cpus=3), head_env, logs["head"]))
        started.append(start(mlflow_command(root, tracking_uri), env, logs["mlflow"]))
        wait_until(lambda: listening(ports["gcs"]), "Ray head's GCS", started, 180, [logs["head"]])
        started.append(
            start(ray_node(root / "node", False, ports, cpus=2), head_env, logs["worker"])
        )
        wait_until(
            lambda: get_json(f"{dashboard}/api/version", token),
            "Ray dashboard",
            started,
            180,
            [logs["head"]],
        )
        wait_until(
            lambda: alive_nodes(dashboard, token) == 2,
            "Ray worker node",
            started,
            180,
            [logs["worker"]],
        )
        wait_until(
            lambda: mlflow_answers(tracking_uri), "MLflow server", started, 120, [logs["mlflow"]]
        )
        client_env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "ALLINONE_DATA")}
        client_env["XDG_STATE_HOME"] = str(root / "state")  # where `jobs` remembers the address
        yield Services(dashboard, tracking_uri, root / "artifacts", client_env)
    finally:
        stop_all(started)
        shutil.rmtree(root, ignore_errors=True)


def mlflow_command(root: Path, uri: str) -> list[str]:
    # --artifacts-destination: the server stores uploads itself (proxied artifacts), so a job on
    # any node logs through HTTP and needs no filesystem shared with the server.
    return [
        str(VENV_BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        uri.rsplit(":", 1)[1],
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]


def allinone(
    *args: str, env: dict[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "allinone"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


# --------------------------------------------------------------------------- the tests
def readme_submit(services: Services, workdir: Path) -> list[str]:
    """The README's submit line as pasted, on this cluster: its pipeline is the smoke one (the
    quickstart trains for 10 minutes), which reads the same ${ALLINONE_DATA} test photos."""
    line = readme_command("allinone submit pipelines/quickstart.yaml")
    for placeholder, here in (
        ("pipelines/quickstart.yaml", "pipelines/smoke.yaml"),
        ("http://localhost:8265", services.dashboard),
        ("http://MLFLOW_HOST:5000", services.tracking_uri),
        ("/mnt/shared/data", str(SHARED_DATA)),
        ("/mnt/shared/runs/quickstart", str(workdir)),
    ):
        assert placeholder in line, placeholder
        line = line.replace(placeholder, here)
    return shlex.split(line)[1:]


def submit_smoke(
    services: Services, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``allinone submit pipelines/smoke.yaml ...`` as a user runs it, followed to the job's end."""
    result = allinone(*args, env=env or services.client_env, timeout_s=SUBMIT_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def smoke_job(services: Services, tmp_path_factory) -> str:
    """The README's submit line, followed to the job's end; returns the job id."""
    result = submit_smoke(services, *readme_submit(services, tmp_path_factory.mktemp("job")))
    found = re.search(r"submitted job (\S+)", result.stdout)
    assert found, result.stdout[-2000:]
    assert "SUCCEEDED" in result.stdout.splitlines()[-1]
    assert (
        "smoke: finished" in result.stdout and "ran as Ray job " + found.group(1) in result.stdout
    )
    return found.group(1)


def test_submitted_run_is_tracked_and_registered(services: Services, smoke_job: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(services.tracking_uri)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name == "smoke"]  # a study's runs may sit beside it
    assert len(parents) == 1 and "mlflow.parentRunId" not in parents[0].data.tags
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert "final/average_psnr" in parent.data.metrics

    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in stages) == ["stage1-denoise", "stage2-dehaze"]
    for stage in stages:
        assert stage.info.status == "FINISHED"
        assert any(name.startswith("test/") for name in stage.data.metrics)

    versions = client.search_model_versions(f"name='allinone' and run_id='{parent.info.run_id}'")
    assert len(versions) == 1
    # The job uploaded through the server, which kept the files where it was told to.
    assert any(services.artifacts.rglob("summary.json"))
    assert any(services.artifacts.rglob("MLmodel"))


@pytest.fixture(scope="module")
def tune_job(services: Services) -> subprocess.CompletedProcess:
    """The smoke pipeline's study, submitted with --tune and followed to its end; its data path
    travels from the shell's ALLINONE_DATA (no --env)."""
    args = ["submit", "pipelines/smoke.yaml", "--tune", "--address", services.dashboard]
    args += ["--tracking-uri", services.tracking_uri]
    return submit_smoke(
        services, *args, env={**services.client_env, "ALLINONE_DATA": str(SHARED_DATA)}
    )


def test_a_submitted_study_runs_its_trials_on_the_cluster(
    services: Services, tune_job: subprocess.CompletedProcess
) -> None:
    from mlflow import MlflowClient

    assert "SUCCEEDED" in tune_job.stdout.splitlines()[-1]
    assert re.search(r"submitted job allinone-tune-smoke-", tune_job.stdout)
    client = MlflowClient(services.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    studies = [r for r in runs if r.info.run_name == "smoke-study"]
    assert len(studies) == 1 and studies[0].info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == studies[0].info.run_id]
    assert len(trials) == 2 and all("allinone.trial" in t.data.tags for t in trials)
    best = studies[0].data.tags["allinone.best_trial"]
    best_run = next(t for t in trials if t.data.tags["allinone.trial"] == best)
    versions = client.search_model_versions(f"name='allinone' and run_id='{best_run.info.run_id}'")
    assert len(versions) == 1


def test_jobs_status_and_list_know_the_finished_job(services: Services, smoke_job: str) -> None:
    # No --address and no RAY_ADDRESS: the last address a command reached (the submit's).
    status = allinone("jobs", "status", smoke_job, env=services.client_env)
    assert status.returncode == 0, status.stderr
    assert "SUCCEEDED" in status.stdout

    listed = allinone(
        "jobs", "list", env={**services.client_env, "RAY_API_SERVER_ADDRESS": services.dashboard}
    )
    assert listed.returncode == 0, listed.stderr
    assert smoke_job in listed.stdout

    wrong = allinone(
        "jobs",
        "list",
        "--address",
        services.dashboard,
        env={**services.client_env, "RAY_AUTH_TOKEN": "not-this-clusters-token"},
    )
    assert wrong.returncode == 2
    assert "refused" in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr


def test_data_only_on_this_machine_is_refused_before_the_job_is_queued(
    services: Services,
) -> None:
    """Without ALLINONE_DATA the pipeline's test photos resolve inside the job's copy of the
    project: a check job on the cluster finds them missing, and no run job is queued."""
    before = _run_jobs(services)
    args = ["submit", "pipelines/smoke.yaml", "--address", services.dashboard]
    done = allinone(*args, env=services.client_env, timeout_s=SUBMIT_TIMEOUT_S)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: not submitted: where the job runs, ")
    assert "test.source: data folder does not exist" in lines[0]
    assert "exists on this machine only" in lines[0] and "--env ALLINONE_DATA=" in lines[0]
    assert _run_jobs(services) == before


def _run_jobs(services: Services) -> set[str]:
    listed = allinone("jobs", "list", "--address", services.dashboard, env=services.client_env)
    assert listed.returncode == 0, listed.stderr
    return set(re.findall(r"allinone-run-smoke-[0-9a-f]+", listed.stdout))


def test_shipped_package_is_what_driver_and_worker_node_import(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job imports the submitted allinone, not the copy installed (editable) on the nodes."""
    from allinone.cluster import jobs as cluster

    script = (
        "import allinone, ray; ray.init(); "
        "where = ray.remote(resources={'worker_node': 1})(lambda: __import__('allinone')"
        ".__file__); print('driver', allinone.__file__); "
        "print('worker', ray.get(where.remote()))"
    )
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", services.client_env["RAY_AUTH_TOKEN_PATH"])
    monkeypatch.setenv("XDG_STATE_HOME", services.client_env["XDG_STATE_HOME"])
    client = cluster.connect(services.dashboard)
    job_id = client.submit_job(
        entrypoint=shlex.join(["python", "-c", script]),
        runtime_env=cluster.job_runtime_env(REPO, {}),
    )
    info = cluster.follow(client, job_id, write=lambda _: None)
    logs = client.get_job_logs(job_id)
    assert str(info.status) == "SUCCEEDED", logs
    paths = dict(
        line.split(" ", 1) for line in logs.splitlines() if line.startswith(("driver ", "worker "))
    )
    for path in paths.values():
        assert "runtime_resources" in path and not path.startswith(str(REPO)), paths


def test_a_head_without_its_dashboard_agent_is_explained() -> None:
    """A head whose dashboard agent could not bind its port (here: held by this test, as another
    Ray instance would) answers every job with Ray's "No available agent"; submit says which
    port and what to do."""
    root = Path(tempfile.mkdtemp(prefix="aio-agent-", dir="/tmp"))  # short: Ray's socket paths
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = base_env(token_file)
    ports = {"gcs": free_port(), "dashboard": free_port(), "client": free_port()}
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        command = [
            arg
            for arg in ray_node(root / "head", True, ports, cpus=1)
            if not arg.startswith("--dashboard-agent-listen-port=")
        ]
        command.append(f"--dashboard-agent-listen-port={held.getsockname()[1]}")
        head = start(command, {**env, "RAY_AUTH_MODE": "token"}, root / "head.log")
        try:
            dashboard = f"http://127.0.0.1:{ports['dashboard']}"
            token = token_file.read_text()
            wait_until(
                lambda: get_json(f"{dashboard}/api/version", token),
                "Ray dashboard",
                [head],
                180,
                [root / "head.log"],
            )
            client_env = {**env, "XDG_STATE_HOME": str(root / "state")}
            args = ["submit", "pipelines/smoke.yaml", "--address", dashboard]
            done = allinone(*args, env=client_env, timeout_s=SUBMIT_TIMEOUT_S)
        finally:
            stop_all([head])
            shutil.rmtree(root, ignore_errors=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1, done.stderr
    for text in ("No available agent", "52365", "--dashboard-agent-listen-port", "another Ray"):
        assert text in done.stderr, text


def test_an_address_where_nothing_listens_fails_in_one_line() -> None:
    port = free_port()  # bound and released: nothing listens there now
    result = allinone(
        "submit",
        "pipelines/smoke.yaml",
        "--address",
        f"http://127.0.0.1:{port}",
        env=dict(os.environ),
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], result.stderr


# --------------------------------------------------------------------------- without a cluster
def test_token_and_address_are_found_where_ray_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from allinone.cluster.jobs import find_token, resolve_address

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token() == "from-home"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert find_token() is None

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:8265")
    assert resolve_address(None) == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://head:8443/")
    assert resolve_address(None) == "https://head:8443"
    assert resolve_address("http://other:8265") == "http://other:8265"  # the flag wins


def test_config_check_inputs_names_data_missing_here(tmp_path: Path) -> None:
    """What the check job runs on the cluster, run here."""
    env = {**os.environ, "ALLINONE_DATA": str(tmp_path / "nowhere")}
    done = allinone("config", "check", "--inputs", "pipelines/smoke.yaml", env=env, timeout_s=600)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "denoise.yaml: test.source: data folder does not exist" in done.stderr
    env["ALLINONE_DATA"] = str(SHARED_DATA)
    checked = allinone(
        "config", "check", "--inputs", "pipelines/smoke.yaml", env=env, timeout_s=600
    )
    assert checked.returncode == 0, checked.stderr


def test_the_last_address_reached_is_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from allinone.cluster.jobs import JobError, address_file, resolve_address

    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    with pytest.raises(JobError, match="pass --address http://HEAD:8265 \\(remembered"):
        resolve_address(None)
    address_file().parent.mkdir(parents=True)
    address_file().write_text("http://head:8265\n")  # what a command that reached it leaves
    assert resolve_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "other:8265")
    assert resolve_address(None) == "http://other:8265"  # the environment first
    assert resolve_address("http://flag:8265") == "http://flag:8265"  # the flag before all


def test_cluster_launcher_config_passes_rays_own_validation() -> None:
    import copy
    import tomllib

    import jsonschema
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["provider"]["type"] == "aws"
    assert "~/.ray/auth_token" in config["file_mounts"]  # every node holds the cluster's token
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)

    # The on-premise recipe in the file's comments: provider "local", no node types.
    local = {
        k: v
        for k, v in config.items()
        if k not in ("available_node_types", "head_node_type", "max_workers")
    }
    local["provider"] = {"type": "local", "head_ip": "10.0.0.10", "worker_ips": ["10.0.0.11"]}
    validate_config(prepare_config(local))

    with pytest.raises(jsonschema.ValidationError):  # the validation is real: a typo fails
        validate_config(prepare_config({**copy.deepcopy(config), "setup_comands": []}))

    # The nodes install what pyproject.toml pins.
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    setup = " ".join(config["setup_commands"])
    for package in ("torch", "torchvision"):
        pin = next(p for p in pins if p.startswith(f"{package}=="))
        assert pin in setup.split(), (pin, setup)
    ray_pin = next(p for p in pins if p.startswith("ray[")).split("==")[1]
    assert config["docker"]["worker_image"].startswith(f"rayproject/ray:{ray_pin}-py311")
