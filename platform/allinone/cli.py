"""The ``allinone`` command: verbs grouped by what they act on.

Every user-facing error (a bad config, a refused image, a missing shard) is printed as one line
naming the file and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from allinone.config import ConfigError, load_pipeline, load_task, resolve_source
from allinone.images import ImageReadError
from allinone.shards import ShardError
from allinone.sources import SourceError

USER_ERRORS = (ConfigError, ShardError, SourceError, ImageReadError)


def _user_errors() -> tuple[type[BaseException], ...]:
    # Errors of the heavier modules are imported only when a command got that far.
    from allinone.curriculum import CurriculumError
    from allinone.run import ClusterError
    from allinone.tracking import TrackingError

    return (*USER_ERRORS, CurriculumError, ClusterError, TrackingError)

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__.splitlines()[0])
shards_app = typer.Typer(no_args_is_help=True, help="Build and verify WebDataset shards.")
models_app = typer.Typer(no_args_is_help=True, help="The model zoo.")
config_app = typer.Typer(no_args_is_help=True, help="Validate task and pipeline configs.")
app.add_typer(shards_app, name="shards")
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

console = Console()
errors = Console(stderr=True)


def main() -> None:
    try:
        app()
    except _user_errors() as err:
        errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)


# --------------------------------------------------------------------------- shards
@shards_app.command("build")
def shards_build(
    task_yaml: Annotated[Path, typer.Argument(help="A task config, e.g. tasks/denoise.yaml")],
    out: Annotated[Path, typer.Option(help="Folder for this task split's shards")],
    source: Annotated[str | None, typer.Option(help="'skimage', a folder of clean images, "
                                                     "or a paired dataset's root")] = None,
    split: Annotated[str, typer.Option(help="train or test")] = "train",
    samples_per_shard: Annotated[int, typer.Option(min=1)] = 64,
    seed: Annotated[int, typer.Option()] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Shards built in parallel")] = 1,
    skip_bad: Annotated[bool, typer.Option(help="Record refused files and go on")] = False,
) -> None:
    """Degrade (or pair) a task's images into WebDataset shards plus a manifest.json."""
    from allinone.progress import build_with_progress
    from allinone.shards import BuildRequest

    if split not in ("train", "test"):
        raise typer.BadParameter("must be 'train' or 'test'", param_hint="--split")
    task = load_task(task_yaml)
    request = BuildRequest(task, split, _source(task_yaml, task, split, source), out,
                           samples_per_shard, seed, skip_bad)
    manifest = build_with_progress(request, workers, console)
    console.print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards -> {out}"
                  + (f"; {len(manifest['skipped'])} files skipped" if manifest["skipped"] else ""))


def _source(task_yaml: Path, task, split: str, given: str | None) -> str:
    if given is not None:
        return str(resolve_source(given, Path.cwd(), "--source", "--source"))
    configured = task.split(split).source
    if configured is None:
        raise ConfigError(task_yaml, f"{split}.source", "no source configured: pass --source DIR")
    return str(resolve_source(configured, task_yaml.resolve().parent, task_yaml, f"{split}.source"))


@shards_app.command("verify")
def shards_verify(folder: Annotated[Path, typer.Argument(help="A shard folder (searched recursively)")]) -> None:
    """Re-check counts, sha256 hashes, and that every sample decodes into an equal-size pair."""
    from allinone.shards import verify_shards

    report = verify_shards(folder)
    for problem in report.problems:
        errors.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    console.print(f"{report.manifests} manifests, {report.shards} shards, {report.samples} samples: "
                  + ("[red]FAILED[/]" if report.problems else "[green]OK[/]"))
    if report.problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- models
@models_app.command("list")
def models_list() -> None:
    """Every model with its presets and parameter counts."""
    from allinone.models import MODELS, build, count_parameters

    table = Table("model", "preset", "parameters", "trainable", "description")
    for name, entry in sorted(MODELS.items()):
        for preset in entry.presets:
            model = build(name, preset)
            table.add_row(name, preset, f"{count_parameters(model):,}",
                          f"{count_parameters(model, trainable_only=True):,}", entry.description)
    console.print(table)


# --------------------------------------------------------------------------- configs
@config_app.command("check")
def config_check(paths: Annotated[list[Path], typer.Argument(help="Task or pipeline YAML files")]) -> None:
    """Validate configs; a file under tasks/ is a task, anything else a pipeline."""
    for path in paths:
        if path.resolve().parent.name == "tasks":
            load_task(path)
        else:
            load_pipeline(path)
        console.print(f"{path}: [green]ok[/]")


# --------------------------------------------------------------------------- running
@app.command("run")
def run(
    pipeline_yaml: Annotated[Path, typer.Argument(help="A pipeline, e.g. pipelines/quickstart.yaml")],
    workdir: Annotated[Path | None, typer.Option(help="Default: ./runs/<pipeline name>")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="Default: sqlite:///<workdir>/mlflow.db")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address; default: local Ray")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --workdir")] = False,
) -> None:
    """Run a whole curriculum: shards, stages, evaluation, registration."""
    from allinone.run import RunOptions, run_pipeline

    pipeline = load_pipeline(pipeline_yaml)
    options = RunOptions(workdir or Path("runs") / pipeline.config.name, tracking_uri, address, resume)
    summary = run_pipeline(pipeline, options, say=console.print)
    _print_matrix(summary)


def _print_matrix(summary: dict) -> None:
    tasks = summary["tasks"]
    table = Table("stage", *tasks, title="PSNR (dB) on each task's test split after each stage")
    for stage, scores in summary["matrix"].items():
        table.add_row(stage, *(f"{scores[t]:.2f}" for t in tasks))
    console.print(table)
    console.print(f"average PSNR after the last stage: {summary['final']['final/average_psnr']:.2f} dB")
