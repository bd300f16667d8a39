"""Shard building: the same shards built by 1 worker and by 2 workers, on real 1024-pixel photos.

    .venv/bin/python benchmarks/shards.py [--quick] [--photos 64] [--variants 8] [--repeats 3]

Builds one synthetic task (blur -> noise -> JPEG, crop 256, several variants per photo) from the
clean photos in ../shared/data/train/CSun_Hays80 with ``allinone.data.shards.build_shards``.
Prints a
markdown table per layout: images/s (source photos) and samples/s for each worker count, the
speed-up over 1 worker measured in the same run (goal on 2 cores: at least 1.6x), CPU seconds per
sample (should not grow with workers), the parallelism achieved (CPU time / wall time) and the
cores other processes used meanwhile (a shared machine lowers the speed-up; this says by how much).
Builds alternate 1, 2, 2, 1, ... so drift in machine load hits both alike; medians are reported.
One untimed build per worker count comes first: the first build pays for cold photo reads and
lazy imports (seen here: 5x slower), which would otherwise count against whichever ran first.
Also checks that both worker counts write byte-identical shards.

Last, the two member formats (``train.members``): the same samples built as PNG and as .npy
members, with bytes a sample on disk, build rate, and the CPU time to decode one member whole
and to the rows a 96 px training crop needs (``allinone.data.members.decode_member``), each
format's pass alternated with the other's, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import CpuWindow, fresh, load_note, photo_folder, table
from allinone.config import TaskConfig
from allinone.data.members import decode_member, pixel_pair
from allinone.data.shards import BuildRequest, build_shards, iter_tar_samples

TASK = {
    "name": "bench",
    "kind": "synthetic",
    "degrade": [
        {"op": "gaussian_blur", "kernel": [7, 21], "sigma": [1, 3]},
        {"op": "gaussian_noise", "sigma": [15, 50]},
        {"op": "jpeg", "quality": [30, 70]},
    ],
}


def build_once(task: TaskConfig, source: Path, out: Path, per_shard: int, workers: int):
    request = BuildRequest(task, "train", str(source), fresh(out), samples_per_shard=per_shard)
    with CpuWindow() as window:
        manifest = build_shards(request, workers=workers)
    return manifest, window


def measure(
    task: TaskConfig, source: Path, scratch: Path, per_shard: int, repeats: int, photos: int
) -> tuple[list[list[object]], bool]:
    runs: dict[int, list] = {1: [], 2: []}
    digests: dict[int, list[str]] = {}
    for workers in (1, 2):  # warm-up, untimed
        build_once(task, source, scratch / f"w{workers}", per_shard, workers)
    for r in range(repeats):
        for workers in (1, 2) if r % 2 == 0 else (2, 1):
            manifest, window = build_once(task, source, scratch / f"w{workers}", per_shard, workers)
            runs[workers].append((manifest["samples"], len(manifest["shards"]), window))
            digests[workers] = [s["sha256"] for s in manifest["shards"]]
    rows, base = [], None
    for workers, results in runs.items():
        samples, shards = results[0][0], results[0][1]
        wall = statistics.median(w.wall for _, _, w in results)
        cpu = statistics.median(w.cpu for _, _, w in results)
        others = statistics.median(w.others for _, _, w in results)
        rate = samples / wall
        base = base or rate
        rows.append(
            [
                workers,
                shards,
                samples,
                wall,
                photos / wall,
                rate,
                f"{rate / base:.2f}x",
                f"{1000 * cpu / samples:.1f}",
                f"{cpu / wall:.2f}",
                f"{others:.2f}",
            ]
        )
    return rows, digests[1] == digests[2]


def member_formats(
    task: TaskConfig, source: Path, scratch: Path, repeats: int, rows: int = 96
) -> list[list[object]]:
    """Each member format's size on disk, build rate and decode CPU, alternated in one run."""
    built = {}
    for members in ("png", "npy"):
        split = task.train.model_copy(update={"members": members})
        manifest, window = build_once(
            task.model_copy(update={"train": split}), source, scratch / members, 64, 2
        )
        tars = sorted((scratch / members).glob("*.tar"))
        pairs = [pixel_pair(m, key) for tar in tars for key, m in iter_tar_samples(tar)]
        size = sum(tar.stat().st_size for tar in tars) / manifest["samples"]
        built[members] = (pairs, size, manifest["samples"] / window.wall)
    timed: dict[str, dict[str, list[float]]] = {m: {"whole": [], "rows": []} for m in built}
    for r in range(repeats):
        for members in built if r % 2 == 0 else reversed(built):
            pairs = built[members][0]
            for part, limit in (("whole", None), ("rows", rows)):
                start = time.process_time()
                for pair in pairs:
                    decode_member(pair.lq, pair.format, "lq", limit)
                    decode_member(pair.gt, pair.format, "gt", limit)
                timed[members][part].append((time.process_time() - start) / (2 * len(pairs)))
    base = {part: statistics.median(timed["png"][part]) for part in ("whole", "rows")}
    table_rows = []
    for members, (_, size, rate) in built.items():
        whole, top = (statistics.median(timed[members][p]) for p in ("whole", "rows"))
        table_rows.append(
            [
                members,
                f"{size / 1024:.0f}",
                f"{size / built['png'][1]:.2f}x",
                rate,
                f"{1000 * whole:.3f}",
                f"{1000 * top:.3f}",
                f"{base['rows'] / top:.0f}x",
            ]
        )
    return table_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=64, help="at most 80 in the folder")
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        nargs="+",
        default=[8, 64],
        help="one table per value: many small shards, and the pipelines' default",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 photos, 8 variants, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.photos, args.variants, args.repeats = 32, 8, 2

    task = TaskConfig.model_validate(
        {**TASK, "train": {"variants": args.variants, "crop": args.crop}}
    )
    print(
        f"shard build: {args.photos} photos x {args.variants} variants, crop {args.crop}, "
        f"blur -> noise -> jpeg; median of {args.repeats}; {load_note()}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as scratch_dir:
        scratch = Path(scratch_dir)
        source = photo_folder(scratch / "photos", args.photos)
        for per_shard in args.samples_per_shard:
            rows, identical = measure(task, source, scratch, per_shard, args.repeats, args.photos)
            print(
                f"\n{per_shard} samples per shard (identical shards from 1 and 2 workers: "
                f"{'yes' if identical else 'NO'})\n"
            )
            print(
                table(
                    [
                        "workers",
                        "shards",
                        "samples",
                        "wall s",
                        "images/s",
                        "samples/s",
                        "vs 1 worker",
                        "CPU ms/sample",
                        "parallelism",
                        "others' cores",
                    ],
                    rows,
                )
            )
        print("\nmember formats (64 samples per shard, 2 workers)\n")
        print(
            table(
                [
                    "members",
                    "KiB/sample",
                    "vs png",
                    "build samples/s",
                    "decode CPU ms/member, whole",
                    "to row 96",
                    "png / this",
                ],
                member_formats(task, source, scratch, args.repeats),
            )
        )


if __name__ == "__main__":
    main()
