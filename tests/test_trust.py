"""What a user and an attacker may rely on: one process per work directory, a local run reachable
from this machine only, and no process of a run left behind when its driver is killed."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from allinone.curriculum.state import LOCK
from conftest import CLEAN_PHOTOS, REPO
from test_curriculum import write_pipeline

HOLD = """
import sys, time
from pathlib import Path
from allinone.curriculum.state import hold_workdir
hold_workdir(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def _allinone(*args: object) -> list[str]:
    return [sys.executable, "-m", "allinone", *map(str, args)]


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_a_held_work_directory_is_refused_naming_its_holder(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path, "held", tasks=("denoise",), steps=(2,))
    path.write_text(path.read_text() + "tune: {num_samples: 1, space: {train.lr: {choice: [1]}}}\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        for verb in (["run"], ["run", "--resume"], ["tune"]):
            command = _allinone(verb[0], path, "--workdir", workdir, *verb[1:])
            line = _one_line(subprocess.run(command, capture_output=True, text=True, timeout=300))
            assert f"in use by process {holder.pid}" in line and str(workdir) in line, line
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in workdir.iterdir()) == [LOCK], "nothing written"


def test_two_fresh_starts_at_once_one_runs_the_other_is_told(tmp_path: Path) -> None:
    path = write_pipeline(tmp_path, "twice", tasks=("denoise",), steps=(200,))
    command = _allinone("run", path, "--workdir", tmp_path / "work")
    runs = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **_own_group()
        )
        for _ in range(2)
    ]
    try:
        first = _first_to_end(runs)
        winner = runs[1 - runs.index(first)]
        stderr = first.stderr.read()
        result = subprocess.CompletedProcess(command, first.returncode, "", stderr)
        assert f"in use by process {winner.pid}" in _one_line(result)
        assert "duplicate column" not in stderr
    finally:
        for run in runs:
            _kill_group(run)


def test_a_local_run_listens_on_loopback_only_and_dies_with_its_driver(tmp_path: Path) -> None:
    """The embedded default, as `allinone run` starts it: every listening socket of the run's
    processes (Ray's GCS, raylet, agents, metrics exporters, workers, the driver) is on
    127.0.0.1; after `kill -9` of the driver alone, none of them is left."""
    path = write_pipeline(tmp_path, "local", tasks=("denoise",), steps=(400,), checkpoint_every=5)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        _allinone("run", path, "--workdir", tmp_path / "work"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        **_own_group(),
    )
    tree: list[psutil.Process] = []
    try:
        tree = _wait_for_training(driver, tmp_path / "work")
        listening = _listening(tree)
        assert listening, "no listening socket found: the probe is broken"
        exposed = {where for where in listening if not _loopback(where[1])}
        assert not exposed, sorted(exposed)
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as `kill -9 PID` does
        driver.wait()
        left = _still_running(tree, timeout_s=60)
        assert not left, [f"{p.pid} {_name(p)}" for p in left]
    finally:
        _kill_group(driver)
        for process in _still_running(tree, timeout_s=0):
            process.kill()


JOIN = """
import sys
import ray
from allinone.cluster.ray import start_ray
start_ray(sys.argv[1])
print(ray.get(ray.remote(lambda: "joined").remote(), timeout=120))
"""


def test_another_driver_joins_the_loopback_cluster(ray_session) -> None:
    """A second driver on this machine (`allinone run --address 127.0.0.1:PORT`, a resumed
    study's) reaches the local cluster at 127.0.0.1, not at this machine's network address."""
    address = ray_session.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    joined = subprocess.run(
        [sys.executable, "-c", JOIN, address], capture_output=True, text=True, timeout=300
    )
    assert joined.stdout.strip() == "joined", joined.stderr[-3000:]


def test_shard_build_workers_die_with_their_parent(tmp_path: Path) -> None:
    build = subprocess.Popen(
        _allinone("shards", "build", REPO / "tasks" / "denoise.yaml", "--source", CLEAN_PHOTOS)
        + ["--out", str(tmp_path / "out"), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        parent = psutil.Process(build.pid)
        deadline = time.monotonic() + 120
        while len(parent.children()) < 2:
            assert build.poll() is None and time.monotonic() < deadline, "no pool workers seen"
            time.sleep(0.1)
        workers = parent.children()
        build.kill()
        build.wait()
        left = _still_running(workers, timeout_s=10)
        assert not left, [p.pid for p in left]
    finally:
        build.kill()


# --------------------------------------------------------------------------- helpers
def _own_group() -> dict:
    return {"start_new_session": True}


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _first_to_end(runs: list[subprocess.Popen], timeout_s: float = 300) -> subprocess.Popen:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in runs:
            if run.poll() is not None:
                return run
        time.sleep(0.1)
    raise AssertionError("neither run ended: both hold the work directory?")


def _wait_for_training(
    driver: subprocess.Popen, workdir: Path, timeout_s: float = 600
) -> list[psutil.Process]:
    """The driver's process tree once the stage has saved a checkpoint: Ray's agents, the Train
    workers' process group and the data stream are all up by then."""
    root = psutil.Process(driver.pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the run ended before it trained"
        if list((workdir / "ray").glob("*/checkpoint_*")):
            return [root, *root.children(recursive=True)]
        time.sleep(0.5)
    raise AssertionError("the stage saved no checkpoint in time")


def _listening(tree: list[psutil.Process]) -> set[tuple[str, str, int]]:
    found = set()
    for process in tree:
        try:
            connections = process.net_connections("inet")
        except psutil.Error:
            continue
        found |= {
            (_name(process), c.laddr.ip, c.laddr.port)
            for c in connections
            if c.status == psutil.CONN_LISTEN
        }
    return found


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket's
    return (mapped or address).is_loopback


def _still_running(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in processes if _alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.5)


def _alive(process: psutil.Process) -> bool:
    try:  # is_running compares start times: a reused pid is another process
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())[:80] or process.name()
    except psutil.Error:
        return "?"
