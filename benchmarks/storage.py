"""Object storage and cluster builds: the training stream reading shards from S3 against local disk,
and a shard build on 1 against 2 Ray nodes, each pair measured in the same run.

- stream: ``allinone.data.stream`` (Ray tasks of a few shard reads each, as a stage trains) over
  the same shards on local disk and in a real S3 API on 127.0.0.1 (moto's server, a process of
  its own), reached through pyarrow as a cluster reaches S3 (AWS_* variables, AWS_ENDPOINT_URL);
  samples/s after the first batch, median of the repeats, S3 / local.
- build: ``build_shards(on_ray=True)`` (one Ray task per shard) on a local Ray cluster of one node,
  then of two (``ray.cluster_utils.Cluster``, 1 CPU each); wall time, 1-node / 2-node. Both builds
  must give the same bytes.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _common import REPO, load_note, machine_use_reported, photo_folder, table
from allinone.config import load_task
from allinone.data import storage
from allinone.data.shards import BuildRequest, build_shards
from allinone.data.stream import task_shards
from data_pipeline import BATCH, ray_stream, throughput

BUCKET = "allinone-bench"


def s3_server() -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server on a free port of 127.0.0.1, and the variables a client needs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return server, env


def request(source: Path, out, photos: int, variants: int, per_shard: int) -> BuildRequest:
    task = load_task(REPO / "tasks" / "denoise.yaml")
    task = task.model_copy(update={"train": task.train.model_copy(update={"variants": variants})})
    return BuildRequest(task, "train", str(source), out, per_shard)


def stream_rates(local: Path, remote, crop: int, samples: int, repeats: int) -> dict[str, float]:
    from allinone.curriculum.run import start_ray

    start_ray(None)  # its workers inherit this process's AWS_* variables
    tasks = {
        "local disk": [task_shards(local, "denoise", 0)],
        "S3": [task_shards(remote, "denoise", 0)],
    }
    for shards in tasks.values():
        throughput(ray_stream, shards, crop, 4 * BATCH)  # warm-up: Ray starts its workers
    rates: dict[str, list[float]] = {name: [] for name in tasks}
    for r in range(repeats):
        for name in tasks if r % 2 == 0 else reversed(tasks):
            rates[name].append(throughput(ray_stream, tasks[name], crop, samples)["rate"])
    import ray

    ray.shutdown()
    return {name: statistics.median(values) for name, values in rates.items()}


def build_times(req: BuildRequest, scratch: Path) -> tuple[dict[int, float], bool]:
    import ray
    from ray.cluster_utils import Cluster

    times, hashes = {}, []
    for nodes in (1, 2):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        try:
            ray.init(address=cluster.address)
            cluster.wait_for_nodes()
            build_shards(replace(req, out=scratch / f"warm-{nodes}"), on_ray=True)  # workers up
            started = time.perf_counter()
            manifest = build_shards(replace(req, out=scratch / f"nodes-{nodes}"), on_ray=True)
            times[nodes] = time.perf_counter() - started
            hashes.append([s["sha256"] for s in manifest["shards"]])
        finally:
            ray.shutdown()
            cluster.shutdown()
    return times, hashes[0] == hashes[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=16)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--samples-per-shard", type=int, default=16)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--samples", type=int, default=1000, help="per stream measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 photos, 400 samples, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.photos, args.samples, args.repeats = 8, 400, 1

    server, env = s3_server()
    os.environ.update(env)  # before Ray starts: its workers reach the store the usual way
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory(prefix="bench-storage-") as folder:
            scratch = Path(folder)
            source = photo_folder(scratch / "photos", args.photos)
            local = scratch / "local"
            build = request(source, local, args.photos, args.variants, args.samples_per_shard)
            build_shards(build, workers=2)
            remote = storage.path(f"s3://{BUCKET}/denoise/train")
            build_shards(replace(build, out=remote), workers=2)
            print(
                f"storage: {args.photos} photos x {args.variants} variants, "
                f"{args.samples_per_shard} samples per shard (256x256 PNG pairs); {load_note()}\n"
            )
            rates = stream_rates(local, remote, args.crop, args.samples, args.repeats)
            rows = [
                [name, rate, f"{rate / rates['local disk']:.2f}x"] for name, rate in rates.items()
            ]
            print(f"stream, batches of {BATCH} crops of {args.crop}, median of {args.repeats}")
            print(table(["shards on", "samples/s", "vs local disk"], rows) + "\n")
            times, same = build_times(build, scratch)
            rows = [
                [nodes, f"{seconds:.1f}", f"{times[1] / seconds:.2f}x"]
                for nodes, seconds in times.items()
            ]
            print("shard build, one Ray task per shard, 1 CPU per node")
            print(table(["nodes", "seconds", "speed-up"], rows))
            print(f"byte-identical across node counts: {same}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    with machine_use_reported():
        main()
