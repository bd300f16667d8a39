"""``cluster/slurm.sbatch``: its syntax, and its commands in a simulated allocation on this machine.

The allocation is two "nodes" on 127.0.0.1: SLURM_* variables set as Slurm sets them, and small
stand-ins for ``srun`` (run the command once per chosen node, here, with the variables srun sets
per task), ``scontrol show hostnames`` and ``hostname --ip-address``. Ray, the token, the run and
the shutdown are the script's own. Whatever the stand-in started is checked, and stopped if need
be, by its own process ids.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from conftest import REPO, SHARED_DATA
from test_cluster import base_env, free_port

SCRIPT = REPO / "cluster" / "slurm.sbatch"

SRUN = r"""#!/bin/bash
# srun stand-in: the command once per node it would run on, here, as srun's tasks see it.
nodes=() exclude="" count=""
while [[ $1 == -* ]]; do
    case $1 in
        -w) IFS=, read -ra nodes <<< "$2"; shift 2 ;;
        --exclude=*) exclude=${1#*=}; shift ;;
        --nodes=*) count=${1#*=}; shift ;;
        *) shift ;;
    esac
done
IFS=, read -ra allocation <<< "$SLURM_JOB_NODELIST"
if ((${#nodes[@]} == 0)); then
    for node in "${allocation[@]}"; do [[ $node != "$exclude" ]] && nodes+=("$node"); done
fi
children=()
trap 'kill -TERM "${children[@]}" 2>/dev/null' TERM
for node in "${nodes[@]:0:${count:-${#nodes[@]}}}"; do
    for i in "${!allocation[@]}"; do [[ ${allocation[$i]} == "$node" ]] && id=$i; done
    echo "$node mode=$RAY_AUTH_MODE token=$RAY_AUTH_TOKEN ${*//$'\n'/ }" >> "$SRUN_LOG"
    SLURMD_NODENAME=$node SLURM_NODEID=$id SLURM_PROCID=${#children[@]} "$@" &
    children+=($!)
    echo $! >> "$SRUN_PIDS"
done
status=0
for pid in "${children[@]}"; do
    wait "$pid" || status=$?
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" || status=$?; done
done
exit $status
"""
SCONTROL = """#!/bin/bash
[[ $1 == show && $2 == hostnames ]] && tr , '\\n' <<< "$3"
"""
HOSTNAME = """#!/bin/bash
echo 127.0.0.1
"""


def test_the_script_parses_and_declares_its_allocation() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    lines = SCRIPT.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    # sbatch reads #SBATCH lines only above the first command.
    directives = [line for line in lines[:first_command] if line.startswith("#SBATCH")]
    assert any("--nodes=" in line for line in directives), directives
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])


def test_a_wrong_verb_is_refused_before_anything_starts() -> None:
    result = subprocess.run(["bash", str(SCRIPT), "eval"], capture_output=True, text=True)
    assert result.returncode == 2 and "run|tune" in result.stderr


@pytest.fixture
def allocation(tmp_path: Path):
    """A two-node allocation's environment, the stand-ins first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": SRUN, "scontrol": SCONTROL, "hostname": HOSTNAME}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # Short path: Ray's unix sockets live under the temp dir and sockets allow about 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="aio-slurm-", dir="/tmp"))
    env = base_env(tmp_path / "no-token-file")
    env.pop("RAY_AUTH_TOKEN_PATH")  # the script hands its own token to every node
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-a,node-b",
        SLURM_NNODES="2",
        SLURM_CPUS_PER_TASK="2",
        SLURM_SUBMIT_DIR=str(REPO),
        SRUN_LOG=str(tmp_path / "srun.log"),
        SRUN_PIDS=str(tmp_path / "srun.pids"),
        RAY_TMPDIR=str(ray_tmp),
        RAY_PORT=str(free_port()),
        RAY_DASHBOARD_PORT=str(free_port()),
        RAY_CLIENT_PORT=str(free_port()),
        RAY_AGENT_PORT=str(free_port()),
        RAY_START_ARGS="--object-store-memory=300000000",
        ALLINONE_DATA=str(SHARED_DATA),
    )
    yield env
    pids = Path(env["SRUN_PIDS"])
    for pid in map(int, pids.read_text().split()) if pids.is_file() else []:
        for process in _tree(pid):  # only if the script failed to stop them
            process.kill()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_a_run_on_the_allocation_starts_ray_everywhere_and_stops_it(
    allocation: dict[str, str], tmp_path: Path
) -> None:
    command = ["bash", str(SCRIPT), "run", "pipelines/smoke.yaml", "--workdir", tmp_path / "w"]
    result = subprocess.run(
        list(map(str, command)), cwd=REPO, env=allocation, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    srun = Path(allocation["SRUN_LOG"])
    log = srun.read_text() if srun.is_file() else "(srun never ran)"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + log
    address = f"127.0.0.1:{allocation['RAY_PORT']}"
    assert f"Ray cluster at {address}: 2 nodes, token authentication on" in result.stdout
    assert "shards denoise/train: " in result.stdout and "one Ray task per shard" in result.stdout
    assert (tmp_path / "w" / "stages" / "stage2-dehaze" / "model.pt").is_file(), "both stages ran"

    starts = [
        line for line in Path(allocation["SRUN_LOG"]).read_text().splitlines() if "ray" in line
    ]
    assert [line.split()[0] for line in starts] == ["node-a", "node-b"], starts
    tokens = {re.search(r"token=(\S*)", line).group(1) for line in starts}
    assert len(tokens) == 1 and len(tokens.pop()) == 64, "one token, handed to every node"
    assert all("mode=token" in line for line in starts)
    assert f"--address={address}" in starts[1]
    # The script stopped every node it started: nothing the stand-in launched is alive.
    pids = map(int, Path(allocation["SRUN_PIDS"]).read_text().split())
    assert not [p for pid in pids for p in _tree(pid) if _running(p)]


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
