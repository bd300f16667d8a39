"""Progress bars for long CLI work (rich): files and samples per second."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from allinone.data.shards import BuildRequest, ShardResult, build_shards, plan_samples


class RateColumn(ProgressColumn):
    """Items per second of one bar, e.g. ``12.3 samples/s``."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed or 0.0
        return Text(f"{speed:7.1f} {task.fields.get('unit', '')}/s")


def build_with_progress(
    request: BuildRequest, workers: int, console: Console, on_ray: bool = False
) -> dict[str, Any]:
    specs, _ = plan_samples(request)
    files = len({s.item.gt for s in specs})
    columns = (
        TextColumn("{task.description:>8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        files_bar = progress.add_task("files", total=files, unit="files")
        samples_bar = progress.add_task("samples", total=len(specs), unit="samples")

        def advance(result: ShardResult) -> None:
            progress.advance(files_bar, result.source_files)
            progress.advance(samples_bar, result.count)

        manifest = build_shards(request, workers=workers, on_shard=advance, on_ray=on_ray)
        progress.update(files_bar, completed=files)
        progress.update(samples_bar, completed=len(specs))
    return manifest
