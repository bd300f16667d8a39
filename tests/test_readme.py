"""The README's commands, pasted in order after ``make run``, as a new user runs them.

Every ```bash block of README.md is read (a trailing backslash joins lines, ``# ...`` comments are
dropped) and its commands run in order, exactly as written, in a fresh project folder that holds
this project's Makefile, pyproject.toml, tasks/ and pipelines/ beside a link ``../shared`` to the
shared data, with no tracking variables set. What differs from a user's machine, and why:

- ``pipelines/quickstart.yaml`` and ``pipelines/tune-prompts.yaml`` there are tiny copies of the
  real ones (same tasks, data paths and eval block; 3 steps per stage, 3 training photos, 1 test
  image per set): the real ones train for 10 minutes and more. Their names, folders and the
  commands that follow them are the real ones.
- ``make ...`` runs this project's Makefile with its installed virtual environment
  (``VENV=<a marker folder> BIN=.venv/bin``), so nothing is installed again.
- ``mlflow ui`` gets ``--port`` of a free port and ``--workers 1`` (its default four server
  processes only cost the suite's two cores), is asked for its experiments, then stopped.
- Blocks that need what this machine cannot give are in ``NOT_HERE`` with the reason and, where
  there is one, the test that runs them instead (the cluster's submit line: test_cluster.py).

``make run`` runs while the suite's own Ray instance is up (``ray_session``): a second instance
on the machine is where Ray's placement-group cleaner used to print its traceback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import CLEAN_PHOTOS, REPO, SHARED_DATA

README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent
# Sections whose blocks cannot run here, and why.
NOT_HERE = {
    "From a laptop to a cluster": "needs a cloud account (ray up); test_cluster.py submits its "
    "submit line to a real local cluster",
    "Models": "needs the authors' released checkpoint files, which cannot be downloaded here",
    "Benchmarks": "measurements that take minutes to an hour each, not commands of the first hour",
    "Serve the registered model": "a shell pipeline around a server (&, $!, pipes); "
    "test_serving.py starts `mlflow models serve` and posts a photo the same way",
}
NOT_RUN = {"make test": "runs this very test suite"}
COMMAND_TIMEOUT_S = 1500


@dataclass(frozen=True)
class Block:
    section: str  # the nearest `## ` heading above the block
    commands: tuple[str, ...]


def readme_blocks(readme: Path = README) -> list[Block]:
    """Every bash block of the README with its section, commands joined and comments dropped."""
    blocks, section = [], ""
    pattern = r"^(## [^\n]*)$|^```bash\n(.*?)^```"
    for match in re.finditer(pattern, readme.read_text(), flags=re.M | re.S):
        if match.group(1):
            section = match.group(1)[3:].strip()
            continue
        joined = re.sub(r"\\\n\s*", " ", match.group(2))
        commands = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
        blocks.append(Block(section, tuple(c for c in commands if c and not c.startswith("#"))))
    return blocks


def readme_command(start: str) -> str:
    """The README's one command that begins with ``start`` (for test_cluster.py)."""
    found = [c for b in readme_blocks() for c in b.commands if c.startswith(start)]
    assert len(found) == 1, (start, found)
    return found[0]


def runnable_commands() -> list[str]:
    return [
        command
        for block in readme_blocks()
        if block.section.split(":")[0] not in NOT_HERE
        for command in block.commands
        if command not in NOT_RUN
    ]


# --------------------------------------------------------------------------- the user's folder
def tiny_copy(real: Path, out: Path, photos: Path, **extra) -> None:
    """``real`` with its tasks, data paths and eval block, trained for 3 steps per stage on a few
    photos and scored on 1 image per test set."""
    config = yaml.safe_load(real.read_text())
    config["data"].update(samples_per_shard=8, batch_size=4, train_source=str(photos))
    config["curriculum"]["steps"] = [3] * len(config["tasks"])
    config["train"].update(log_every=1, checkpoint_every=3, warmup_steps=1)
    config["eval"]["max_images"] = 1
    for key, value in extra.items():
        config[key] = value
    out.write_text(yaml.safe_dump(config, sort_keys=False))


def make_project(root: Path) -> Path:
    project = root / "project"
    project.mkdir()
    (root / "shared").symlink_to(SHARED_DATA.parent)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "tasks", project / "tasks")
    shutil.copytree(REPO / "pipelines", project / "pipelines")
    photos = root / "photos"
    photos.mkdir()
    for path in sorted(CLEAN_PHOTOS.iterdir())[:3]:
        shutil.copy2(path, photos / path.name)
    pipelines = project / "pipelines"
    tiny_copy(REPO / "pipelines" / "quickstart.yaml", pipelines / "quickstart.yaml", photos)
    study = yaml.safe_load((REPO / "pipelines" / "tune-prompts.yaml").read_text())["tune"]
    # One trial: the README line works as pasted (test_tune.py runs studies of several).
    study.update(num_samples=1, eval_every=3, asha={"grace_steps": 3, "reduction_factor": 2})
    tiny_copy(REPO / "pipelines" / "tune-prompts.yaml", pipelines / "tune-prompts.yaml", photos,
              tune=study)  # fmt: skip
    marker = root / "venv"  # the Makefile's "installed" marker: nothing is installed again
    marker.mkdir()
    (marker / ".installed").touch()
    return project


def user_env(root: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_TRACKING_URI", "ALLINONE_", "RAY_ADDRESS"))
    }
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        COLUMNS="80",  # what a terminal gives: every table must fit
        XDG_STATE_HOME=str(root / "state"),
    )
    return env


# --------------------------------------------------------------------------- running a command
@dataclass
class Ran:
    command: str
    returncode: int
    stdout: str
    stderr: str


def run_command(command: str, project: Path, env: dict[str, str]) -> Ran:
    args = shlex.split(command)
    if args[0] == "make":
        args = ["make", *args[1:], f"VENV={project.parent / 'venv'}", f"BIN={VENV_BIN}"]
    if args[:2] == ["mlflow", "ui"]:
        return _serve_briefly(command, args, project, env)
    done = subprocess.run(
        args, cwd=project, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    return Ran(command, done.returncode, done.stdout, done.stderr)


def _serve_briefly(command: str, args: list[str], project: Path, env: dict[str, str]) -> Ran:
    """``mlflow ui`` as pasted, on a free port: its experiments listed through its REST API."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [*args, "--port", str(port), "--workers", "1"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=50"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return Ran(command, 0, response.read().decode(), "")
            except OSError:
                time.sleep(1)
        return Ran(command, 1, "", f"mlflow ui did not answer on port {port}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


# --------------------------------------------------------------------------- the session
@dataclass
class Session:
    ran: dict[str, Ran]  # by command; the closing block's under "block: <command>"
    console_log: str  # runs/quickstart/logs/console.log after `make run` (`make clean` ends it)
    report_bytes: int


@pytest.fixture(scope="module")
def session(tmp_path_factory, ray_session) -> Session:
    """Every runnable README command, in order, in one user's folder; after ``make run``, the
    commands of the closing block it printed."""
    root = tmp_path_factory.mktemp("readme")
    project, env = make_project(root), user_env(root)
    ran: dict[str, Ran] = {}
    log, size = "", 0
    for command in runnable_commands():
        ran[command] = result = run_command(command, project, env)
        assert result.returncode == 0, (
            f"{command}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
        if command == "make run":
            log = (project / "runs" / "quickstart" / "logs" / "console.log").read_text()
            (root / "make-run.txt").write_text(result.stdout)  # what the user saw, to read later
            for block_command in next_commands(result.stdout):
                ran[f"block: {block_command}"] = run_command(block_command, project, env)
            # What they wrote, gone: the README's own restore and report write the same names,
            # and restore refuses to overwrite.
            shutil.rmtree(project / "restored", ignore_errors=True)
            (project / "report.html").unlink(missing_ok=True)
        if command.startswith("allinone report"):
            size = (project / "report.html").stat().st_size
    return Session(ran, log, size)


def next_commands(output: str) -> list[str]:
    """The closing block's commands but ``mlflow ui`` (the README's own is served above)."""
    after = output[output.rindex("next:") :].splitlines()[1:]
    commands = [line.split(None, 1)[1] for line in after if line.startswith("  ")]
    return [c for c in commands if c.startswith("allinone ")]


def test_the_readme_has_the_commands_of_the_first_hour() -> None:
    commands = runnable_commands()
    assert commands[0] == "make run"
    for start in ("allinone eval", "allinone restore", "allinone report", "mlflow ui",
                  "make run RESUME=1", "make clean", "allinone tune"):  # fmt: skip
        assert any(c.startswith(start) for c in commands), start


def test_every_command_of_the_readme_works_as_pasted_in_order(session) -> None:
    for command in runnable_commands():
        assert session.ran[command].returncode == 0, command


def test_make_run_shows_progress_and_hides_the_rest(session) -> None:
    done = session.ran["make run"]
    shown = done.stdout + done.stderr
    assert re.search(r"stage1-denoise 3/3: train PSNR [\d.]+ dB", shown), shown[-3000:]
    assert "run 9/9 steps" in shown
    for noise in ("Traceback", "WARNING", "PlacementGroupCleaner", "TrainingReport", "DeepSpeed",
                  "INFO mlflow", "Successfully registered", "(RayTrainWorker"):  # fmt: skip
        assert noise not in shown, noise
    assert "full log" in shown and "runs/quickstart/logs/console.log" in shown


def test_no_placement_group_traceback_beside_a_second_ray_instance(session) -> None:
    # What the quiet console hides is in the log: the workers' output is there, Ray's
    # placement-group cleaner's traceback is not (it finds its own cluster's State API).
    assert "(RayTrainWorker pid=" in session.console_log
    assert "PlacementGroupCleanerMonitor" not in session.console_log
    assert "Found multiple active Ray instances" not in session.console_log


def test_make_run_ends_with_the_block_and_the_real_test_sets(session) -> None:
    out = session.ran["make run"].stdout
    block = out[out.rindex("quickstart: finished") :]
    run_id = re.search(r"run id\s+([0-9a-f]{32})", block).group(1)
    assert "work folder   runs/quickstart" in block and "tracking URI" in block
    # Where the time went: the whole run, and each stage's start-up before it trained.
    timing = re.search(r"time\s+(\d+\.\d) min \(stage start-ups: ([\d +]+) s, fit", block)
    startups = [float(s) for s in timing.group(2).split(" + ")]
    assert len(startups) == 3  # the quickstart's three stages
    assert all(s >= 1 for s in startups) and sum(startups) < 60 * float(timing.group(1))
    assert re.search(r"model\s+models:/allinone/1 @champion \(first model\)", block)
    for name in ("CBSD68-sigma15", "CBSD68-sigma25", "CBSD68-sigma50", "Rain100L", "SOTS-outdoor"):
        assert name in block
    assert re.search(r"[+-]\d+\.\d\d vs (NLM|TV|DCP|input)", block)
    tables = block[block.index("Real test sets") : block.index("next:")]
    assert max(len(line) for line in tables.splitlines()) <= 80  # commands alone stay unwrapped
    commands = next_commands(out)
    assert [c.split()[1] for c in commands] == ["eval", "restore", "report"]
    assert f"allinone report {run_id} --out report.html" in commands
    assert all("--tracking-uri" not in c for c in commands)  # found from the folder by itself


def test_the_closing_blocks_commands_work(session) -> None:
    ran = [r for key, r in session.ran.items() if key.startswith("block: ")]
    assert len(ran) == 3
    for result in ran:
        assert result.returncode == 0, f"{result.command}\n{result.stderr[-3000:]}"


def test_eval_tables_fit_80_columns_with_every_sigma_told_apart(session) -> None:
    out = next(r for c, r in session.ran.items() if c.startswith("allinone eval")).stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    for sigma in (15, 25, 50):
        assert len(re.findall(rf"CBSD68-sigma{sigma}\b", out)) == 2  # headline and detail
    # The model's own default count: eval.max_images of the pipeline it was trained with.
    assert re.search(r"CBSD68-sigma25\s+1\s+\d", out), out


def test_the_report_page_stays_small(session) -> None:
    # The quickstart's grids, whatever its training length: the real test sets' first images.
    assert 0 < session.report_bytes < 3_000_000


def test_mlflow_ui_serves_the_runs_store(session) -> None:
    served = next(r for c, r in session.ran.items() if c.startswith("mlflow ui"))
    names = [e["name"] for e in json.loads(served.stdout)["experiments"]]
    assert "quickstart" in names and "allinone-eval" in names


def test_make_run_again_resumes_or_starts_fresh_as_asked(session, tmp_path) -> None:
    resumed = session.ran["make run RESUME=1"]
    assert "finished earlier" in resumed.stdout, resumed.stdout[-2000:]
    project = make_project(tmp_path)
    env = user_env(tmp_path)
    (project / "runs" / "quickstart").mkdir(parents=True)
    (project / "runs" / "quickstart" / "state.json").write_text("{}")
    again = run_command("make run", project, env)
    assert again.returncode != 0
    assert "'make run RESUME=1' continues it, 'make clean' removes runs/" in again.stdout
    assert run_command("make clean", project, env).returncode == 0
    assert not (project / "runs").exists()
