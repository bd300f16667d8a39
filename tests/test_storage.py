"""Shards and checkpoints in object storage: a real S3 API (moto's server) on 127.0.0.1, reached
through the same pyarrow and boto3 clients a cluster uses, configured the standard way (AWS_*
variables, AWS_ENDPOINT_URL).

Tests that run Ray against S3 use a 2-node cluster of their own, started here with the S3 settings
in its environment as a cluster's nodes have them: the suite's shared Ray session was started
before this server existed, so its workers could not reach it. Everything started here is stopped
by its own process ids.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from allinone.config import ConfigError, load_pipeline, load_task
from allinone.curriculum.run import run_pipeline
from allinone.curriculum.state import RunOptions
from allinone.data import storage
from allinone.data.shards import (
    BuildRequest,
    ShardError,
    build_shards,
    read_manifest,
    shard_urls,
    verify_shards,
)
from allinone.data.stream import read_crops, task_shards
from allinone.evaluate import scoring
from conftest import CLEAN_PHOTOS, REPO, TEST_SETS, allinone_cli
from test_cluster import (
    base_env,
    free_port,
    listening,
    mlflow_answers,
    mlflow_command,
    ray_node,
    start,
    stop_all,
    wait_until,
)

PHOTOS = sorted(CLEAN_PHOTOS.glob("*.jpg"))[:3]


@dataclass
class S3:
    env: dict[str, str]  # what a node's (or a user's) environment holds to reach the store
    bucket: str
    client: object  # boto3's S3 client

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def modified(self, key: str):
        return self.client.head_object(Bucket=self.bucket, Key=key)["LastModified"]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # credentials come from here, never from a probe
    }
    bucket = f"allinone-{secrets.token_hex(4)}"  # this process caches a file system per bucket
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            client = boto3.client("s3")
            client.create_bucket(Bucket=bucket)
            yield S3(env, bucket, client)
    finally:
        server.stop()


def noise_task(folder: Path) -> Path:
    path = folder / "noise.yaml"
    path.write_text(
        "name: noise\nkind: synthetic\ndegrade:\n  - {op: gaussian_noise, sigma: [15, 50]}\n"
        "train: {variants: 2, crop: 48}\ntest: {crop: 48}\n"
    )
    return path


def photos(folder: Path, extra: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for photo in PHOTOS:
        shutil.copy(photo, folder / photo.name)
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    return folder


def request(folder: Path, source: Path, out, split: str = "train", **kw) -> BuildRequest:
    return BuildRequest(load_task(noise_task(folder)), split, str(source), out, 2, 0, **kw)


def hashes(manifest: dict) -> list[str]:
    return [s["sha256"] for s in manifest["shards"]]


@dataclass
class Built:
    source: Path  # the photos (their paths are part of every sample's metadata)
    local: Path
    remote: storage.ObjectPath
    manifest: dict  # the local build's


@pytest.fixture(scope="module")
def built(s3: S3, tmp_path_factory) -> Built:
    """The same build on local disk and, through the command line, in S3."""
    folder = tmp_path_factory.mktemp("built")
    source = photos(folder / "photos")
    local = build_shards(request(folder, source, folder / "local"))
    out = s3.uri("built/noise/train")
    result = allinone_cli(
        "shards", "build", noise_task(folder), "--source", source, "--out", out,
        "--samples-per-shard", 2, env={**os.environ, **s3.env},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"6 samples in 3 shards -> {out}" in result.stdout
    return Built(source, folder / "local", storage.path(out), local)


# --------------------------------------------------------------------------- shards in S3
def test_a_build_to_s3_holds_the_local_bytes_and_verifies(s3: S3, built: Built) -> None:
    assert hashes(read_manifest(built.remote, "noise", "train")) == hashes(built.manifest)
    names = [f"built/noise/train/noise-train-{i:06d}.tar" for i in range(3)]
    assert s3.keys("built/") == sorted([*names, "built/noise/train/manifest.json"])
    verified = allinone_cli("shards", "verify", s3.uri("built"), env={**os.environ, **s3.env})
    assert verified.returncode == 0, verified.stderr
    assert "1 manifests, 3 shards, 6 samples" in verified.stdout


def test_verify_names_a_corrupt_or_missing_shard_in_s3(s3: S3, built: Built) -> None:
    copy = storage.path(s3.uri("corrupt/noise/train"))
    for name in ("manifest.json", "noise-train-000000.tar", "noise-train-000001.tar"):
        (copy / name).write_bytes((built.remote / name).read_bytes())
    data = bytearray((copy / "noise-train-000000.tar").read_bytes())
    data[700] ^= 0xFF
    (copy / "noise-train-000000.tar").write_bytes(bytes(data))
    problems = verify_shards(copy.parent.parent).problems
    assert problems[0].startswith(f"{copy / 'noise-train-000000.tar'}: sha256 differs")
    assert problems[-1] == f"{copy / 'noise-train-000002.tar'}: shard missing"


def test_an_interrupted_build_in_s3_is_never_taken_as_complete(s3: S3, tmp_path: Path) -> None:
    truncated = {"zz_truncated.jpg": PHOTOS[0].read_bytes()[:2000]}
    out = storage.path(s3.uri("broken/noise/train"))
    with pytest.raises(ShardError, match="zz_truncated.jpg"):
        build_shards(request(tmp_path, photos(tmp_path / "photos", truncated), out))
    manifest = read_manifest(out, "noise", "train")
    assert manifest["complete"] is False and sum(bool(s) for s in manifest["shards"]) == 3
    with pytest.raises(ShardError, match="incomplete"):
        shard_urls(out, "noise", "train")
    assert f"{out / 'manifest.json'}: build is incomplete" in verify_shards(out).problems


def test_a_resumed_build_in_s3_keeps_its_good_shards(s3: S3, tmp_path: Path) -> None:
    source = photos(tmp_path / "photos")
    out = storage.path(s3.uri("resumed/noise/train"))
    first = build_shards(request(tmp_path, source, out))
    key = f"resumed/noise/train/noise-train-{0:06d}.tar"
    kept = s3.modified(key)
    (out / "noise-train-000001.tar").unlink()
    (out / "noise-train-000002.tar").write_bytes(
        (out / "noise-train-000002.tar").read_bytes()[:999]
    )
    time.sleep(1.1)  # S3 times objects to the second: a rewritten shard would show a later one
    again = build_shards(request(tmp_path, source, out))
    assert s3.modified(key) == kept, "a good shard must not be uploaded again"
    assert again["shards"] == first["shards"] and verify_shards(out).problems == []


def test_the_stream_and_evaluation_read_shards_in_s3(s3: S3, built: Built, tmp_path: Path) -> None:
    from_s3 = task_shards(built.remote, "noise", 0)
    assert from_s3.urls[0].startswith("s3://") and from_s3.counts == (2, 2, 2)
    read = {"samples": 2, "limit": 2, "crops": 1, "turns": True, "seed": 7, "task_id": 0}
    for here, there in zip(task_shards(built.local, "noise", 0).urls, from_s3.urls, strict=True):
        crops = [list(read_crops({**read, "url": url}, 32)) for url in (here, there)]
        assert all(np.array_equal(a["lq"], b["lq"]) for a, b in zip(*crops, strict=True))
    # Evaluation reads a test split's pairs (what stage ends and validation score).
    source = photos(tmp_path / "photos")
    folders = [tmp_path / "test", storage.path(s3.uri("scored/noise/test"))]
    for folder in folders:
        build_shards(request(tmp_path, source, folder, split="test"))
    pairs = [list(scoring.test_pairs(folder, "noise")) for folder in folders]
    assert len(pairs[0]) == 3
    for (key, lq, gt), (key2, lq2, gt2) in zip(*pairs, strict=True):
        assert key == key2 and np.array_equal(lq, lq2) and np.array_equal(gt, gt2)


def test_a_store_that_cannot_be_used_is_named_before_anything_is_written(
    s3: S3, tmp_path: Path
) -> None:
    path = pipeline_file(tmp_path, "nobucket", s3.uri("x"), steps=(2, 2))
    path.write_text(path.read_text().replace(f"s3://{s3.bucket}/x/shards", "s3://nowhere-0/x"))
    with pytest.raises(ConfigError, match=r"data\.shards: s3://nowhere-0/x: .*does not exist"):
        run_pipeline(load_pipeline(path), RunOptions(tmp_path / "work"))
    result = allinone_cli(
        "run", pipeline_file(tmp_path, "flag", s3.uri("y")), "--workdir", tmp_path / "w",
        "--storage", "s3:///no-bucket", env={**os.environ, **s3.env},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--storage: s3:///no-bucket: a storage URI names its bucket" in result.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- Ray shards
def test_ray_tasks_build_the_local_bytes_and_resume(tmp_path: Path, ray_session) -> None:
    source = photos(tmp_path / "photos")
    local = build_shards(request(tmp_path, source, tmp_path / "local"))
    on_ray = build_shards(request(tmp_path, source, tmp_path / "ray"), on_ray=True)
    assert hashes(on_ray) == hashes(local)
    (tmp_path / "ray" / "noise-train-000001.tar").unlink()
    kept = (tmp_path / "ray" / "noise-train-000000.tar").stat().st_mtime_ns
    assert hashes(build_shards(request(tmp_path, source, tmp_path / "ray"), on_ray=True)) == hashes(
        local
    )
    assert (tmp_path / "ray" / "noise-train-000000.tar").stat().st_mtime_ns == kept
    bad = photos(tmp_path / "bad", {"zz_truncated.jpg": PHOTOS[0].read_bytes()[:2000]})
    with pytest.raises(ShardError, match=r"zz_truncated\.jpg.*--skip-bad") as failed:
        build_shards(request(tmp_path, bad, tmp_path / "bad-out"), on_ray=True)
    assert "Traceback" not in str(failed.value), "the cause, not Ray's wrapping of it"


# --------------------------------------------------------------------------- a cluster and S3
@dataclass
class Cluster:
    address: str  # 127.0.0.1:GCS_PORT
    env: dict[str, str]  # a driver's: the token, RAY_AUTH_MODE=token, the S3 settings


@pytest.fixture(scope="module")
def cluster(s3: S3) -> Iterator[Cluster]:
    # Short path: Ray's unix sockets live under --temp-dir and sockets allow about 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="aio-s3-", dir="/tmp"))
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {**base_env(token_file), **s3.env, "RAY_AUTH_MODE": "token"}
    ports = {"gcs": free_port(), "dashboard": free_port(), "client": free_port()}
    logs = [root / "head.log", root / "worker.log"]
    started: list[subprocess.Popen] = []
    try:
        started.append(start(ray_node(root / "head", True, ports, cpus=3), env, logs[0]))
        wait_until(lambda: listening(ports["gcs"]), "Ray head", started, 180, logs)
        started.append(start(ray_node(root / "node", False, ports, cpus=2), env, logs[1]))
        address = f"127.0.0.1:{ports['gcs']}"
        wait_until(lambda: _nodes(address, env) == 2, "second Ray node", started, 180, logs)
        yield Cluster(address, env)
    finally:
        stop_all(started)
        shutil.rmtree(root, ignore_errors=True)


def _nodes(address: str, env: dict[str, str]) -> int:
    script = (
        f"import ray; ray.init({address!r}); print('nodes', sum(n['Alive'] for n in ray.nodes()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    counts = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("nodes ")]
    return int(counts[-1]) if counts else 0


def test_a_two_node_build_writes_the_local_bytes_to_s3(
    s3: S3, cluster: Cluster, tmp_path: Path, built: Built
) -> None:
    out = s3.uri("cluster/noise/train")
    result = allinone_cli(
        "shards", "build", noise_task(tmp_path), "--source", built.source,
        "--out", out, "--samples-per-shard", 2, "--address", cluster.address, env=cluster.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert hashes(read_manifest(storage.path(out), "noise", "train")) == hashes(built.manifest)


def pipeline_file(folder: Path, name: str, prefix: str, steps=(4, 2), every: int = 2) -> Path:
    """Two stages whose shards and checkpoints live under ``prefix`` in S3, on a few real photos
    (3 to degrade for training, 2 of CBSD68 for testing: the shard step stays short)."""
    train, test = photos(folder / "train"), folder / "test"
    test.mkdir(exist_ok=True)
    for image in sorted((TEST_SETS / "CBSD68").glob("*.png"))[:2]:
        shutil.copy(image, test / image.name)
    path = folder / f"{name}.yaml"
    path.write_text(f"""
name: {name}
tasks_dir: {REPO / "tasks"}
tasks: [denoise, dehaze]
data:
  {{samples_per_shard: 8, crop: 32, batch_size: 4, shards: {prefix}/shards,
   train_source: {train}, test_source: {test}}}
model: {{name: promptir, preset: tiny}}
curriculum: {{mode: cumulative, steps: [{steps[0]}, {steps[1]}]}}
train: {{lr: 1.0e-3, zero_stage: 2, checkpoint_every: {every}, log_every: 1, storage: {prefix}/ray}}
eval: {{max_images: 1}}
""")
    return path


DRIVER = """
import sys
from pathlib import Path
from allinone.config import load_pipeline
from allinone.curriculum.run import run_pipeline
from allinone.curriculum.state import RunOptions
from allinone.train.job import FaultInjection

path, workdir, address, at_step, marker = sys.argv[1:]
fault = FaultInjection(at_step=int(at_step), marker=marker)
options = RunOptions(Path(workdir), address=address, fault=fault, register=False)
run_pipeline(load_pipeline(path), options)
"""


def stage_steps(workdir: Path, stage: str) -> list[int]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run_id = json.loads((workdir / "state.json").read_text())["stage_runs"][stage]
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def test_a_curriculum_in_s3_survives_a_killed_worker(
    s3: S3, cluster: Cluster, tmp_path: Path
) -> None:
    path = pipeline_file(tmp_path, "s3run", s3.uri("run"))
    workdir = tmp_path / "work"
    marker = tmp_path / "killed-once"
    command = [sys.executable, "-c", DRIVER, path, workdir, cluster.address, "3", marker]
    result = subprocess.run(
        list(map(str, command)), env=cluster.env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "samples, one Ray task per shard" in result.stdout, "the cluster built the shards"
    assert marker.read_text() == "3", "the worker process was killed at step 3"
    # Steps 1-3 ran, the worker died before step 4, and its restart went on from the step-2
    # checkpoint, which only S3 holds.
    assert "[stage1-denoise] step 2/4 resumed from its checkpoint" in result.stdout
    assert sorted(set(stage_steps(workdir, "stage1-denoise"))) == [1, 2, 3, 4]
    keys = s3.keys("run/")
    assert any(k.startswith("run/shards/denoise/train/denoise-train-") for k in keys)
    assert "run/shards/dehaze/test/manifest.json" in keys
    checkpoints = [k for k in keys if "/checkpoint_" in k and k.endswith("/model.pt")]
    runs = {k.split("/")[2] for k in checkpoints}  # run/ray/<name>-<stage>-<attempt>/...
    assert {run.split("-")[1] for run in runs} == {"stage1", "stage2"}, runs
    # The second stage's workers started from the first stage's weights, read from S3.
    start = next(k for k in keys if k.startswith("run/ray/start/") and "stage2" in k)
    local = workdir / "stages" / "stage1-denoise" / "model.pt"
    assert storage.path(s3.uri(start)).read_bytes() == local.read_bytes()
    assert not list((workdir / "ray").rglob("checkpoint_*")), "no checkpoint on local disk"


def test_a_resumed_run_finds_its_checkpoint_in_s3(s3: S3, cluster: Cluster, tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, "s3resume", s3.uri("resume"), steps=(2, 8), every=4)
    workdir = tmp_path / "work"
    command = [sys.executable, "-m", "allinone", "run", str(path), "--workdir", str(workdir)]
    command += ["--address", cluster.address]
    driver = subprocess.Popen(
        command, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_checkpoint_in_s3(s3, "resume/ray/", "stage2-dehaze", driver)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    resumed = subprocess.run(
        [*command, "--resume"], env=cluster.env, capture_output=True, text=True, timeout=1500
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "stage1-denoise: finished earlier, skipped" in resumed.stdout
    steps = stage_steps(workdir, "stage2-dehaze")
    assert sorted(set(steps)) == list(range(1, 9))
    repeated = {s for s in steps if steps.count(s) > 1}
    assert not repeated or min(repeated) > 4, steps  # it went on from a checkpoint in S3


def _wait_for_checkpoint_in_s3(s3: S3, prefix: str, stage: str, driver) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the driver ended before it could be killed"
        for key in s3.keys(prefix):
            if stage in key and key.endswith("checkpoint_manager_snapshot.json"):
                snapshot = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
                if b"checkpoint_" in snapshot:
                    return
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint of {stage} reached S3 in time")


def test_a_study_keeps_its_shards_checkpoints_and_artifacts_in_s3(
    s3: S3, cluster: Cluster, tmp_path: Path
) -> None:
    """``allinone tune`` takes data.shards and train.storage as a run does: the trials read the
    study's shards from S3 and keep their checkpoints there, each under its trial's prefix; with
    an MLflow server whose artifacts go to S3 (``--artifacts-destination``), so do the runs'
    artifacts: MLflow's own proxy writes them, nothing of ours."""
    path = pipeline_file(tmp_path, "s3study", s3.uri("study"), steps=(2, 2), every=2)
    path.write_text(
        path.read_text()
        + "tune: {num_samples: 1, search: random, scheduler: fifo, eval_every: 2,\n"
        + "       register_best: false, space: {train.lr: {loguniform: [1.0e-3, 2.0e-3]}}}\n"
    )
    workdir = tmp_path / "work"
    uri = f"http://127.0.0.1:{free_port()}"
    server = mlflow_command(tmp_path, uri)
    server[server.index("--artifacts-destination") + 1] = s3.uri("mlartifacts")
    log = tmp_path / "mlflow.log"
    mlflow_server = start(server, {**os.environ, **s3.env}, log)
    try:
        wait_until(lambda: mlflow_answers(uri), "MLflow server", [mlflow_server], 120, [log])
        command = [sys.executable, "-m", "allinone", "tune", str(path), "--workdir", str(workdir)]
        done = subprocess.run(
            [*command, "--address", cluster.address, "--tracking-uri", uri],
            env=cluster.env, capture_output=True, text=True, timeout=1500,
        )  # fmt: skip
    finally:
        stop_all([mlflow_server])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    keys = s3.keys("")
    assert "study/shards/denoise/train/manifest.json" in keys
    (trial,) = [p.name for p in (workdir / "trials").iterdir()]
    checkpoints = [k for k in keys if k.startswith(f"study/ray/{trial}/") and "/checkpoint_" in k]
    assert {k.split("/")[3].split("-")[1] for k in checkpoints} == {"stage1", "stage2"}
    assert any(k.startswith("mlartifacts/") and k.endswith(".png") for k in keys), "grids"
    assert not (workdir / "shards").exists(), "no shards on local disk"
    assert not list(workdir.rglob("checkpoint_*")), "no checkpoint on local disk"
    assert not list(workdir.rglob("*.png")), "no artifact on local disk"
