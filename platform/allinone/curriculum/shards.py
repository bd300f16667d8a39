"""Every task split of a pipeline built into shards under the run's shard root, from its source.

On a Ray cluster of several nodes every node builds: one Ray task per shard (the sources must then
be readable on every node, e.g. a shared mount); on one machine, local processes.
"""

from __future__ import annotations

from pathlib import Path

from allinone.config import ConfigError, Pipeline, resolve_source
from allinone.data.shards import BuildRequest, build_shards, shard_folder
from allinone.data.storage import StoragePath


def prepare_shards(
    pipeline: Pipeline, shards: StoragePath, workers: int = 2, on_build=print
) -> None:
    """Build (or resume) every task's train and test shards under the shard root."""
    config = pipeline.config
    on_ray = ray_nodes() > 1
    for (name, split), source in shard_sources(pipeline).items():
        request = BuildRequest(
            pipeline.tasks[name],
            split,
            str(source),
            shard_folder(shards, name, split),
            config.data.samples_per_shard,
            config.seed,
            max_pixels=config.data.max_pixels,
        )
        manifest = build_shards(request, workers=workers, on_ray=on_ray)
        where = ", one Ray task per shard" if on_ray else ""
        on_build(f"shards {name}/{split}: {manifest['samples']} samples{where}")


def ray_nodes() -> int:
    """Alive nodes of the Ray cluster this process has joined; 0 when it has joined none."""
    import ray

    return sum(node["Alive"] for node in ray.nodes()) if ray.is_initialized() else 0


def shard_sources(pipeline: Pipeline) -> dict[tuple[str, str], str | Path]:
    """Every task split's source, resolved: ``"skimage"`` or an existing folder. A missing one
    raises the ConfigError naming the file and field that gave it."""
    sources = {}
    for name in pipeline.tasks:
        for split in ("train", "test"):
            source, origin, field_name = _split_source(pipeline, name, split)
            sources[name, split] = resolve_source(source, origin.parent, origin, field_name)
    return sources


def _split_source(pipeline: Pipeline, task: str, split: str):
    """Where a task's split comes from, with the config field that said so (for errors)."""
    data = pipeline.config.data
    per_task = data.train_sources if split == "train" else data.test_sources
    if task in per_task:
        return per_task[task], pipeline.path, f"data.{split}_sources.{task}"
    shared = data.train_source if split == "train" else data.test_source
    if shared and pipeline.tasks[task].kind == "synthetic":  # a photo folder holds no pairs
        return shared, pipeline.path, f"data.{split}_source"
    source = pipeline.tasks[task].split(split).source
    path = pipeline.task_path(task)
    if source is None:
        raise ConfigError(path, f"{split}.source", "no source configured for this split")
    return source, path, f"{split}.source"
