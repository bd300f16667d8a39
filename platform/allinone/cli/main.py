"""The ``allinone`` command: verbs grouped by what they act on.

Every user-facing error (a bad config, a refused image, a missing shard) is printed as one line
naming the file and exits with status 2; anything else is a bug and keeps its traceback.

Each verb imports the stages it drives inside its own function: ``allinone --help`` and
``config check`` must not pay seconds for torch, Ray and MLflow they never use.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from allinone.config import (
    DEFAULT_MAX_PIXELS,
    ConfigError,
    load_pipeline,
    load_task,
    resolve_source,
)
from allinone.data.images import ImageReadError
from allinone.data.shards import ShardError
from allinone.data.sources import SourceError
from allinone.data.storage import StorageError

USER_ERRORS = (ConfigError, ShardError, SourceError, ImageReadError, StorageError)


# The heavier stages' errors, by module: only a module that was imported can have raised one, so
# looking them up in ``sys.modules`` costs nothing (``--help`` exits through here too).
_STAGE_ERRORS = (
    ("allinone.cli.restore", "RestoreError"),
    ("allinone.cli.stores", "StoreError"),
    ("allinone.cluster.jobs", "JobError"),
    ("allinone.cluster.ray", "ClusterError"),
    ("allinone.curriculum.state", "CurriculumError"),
    ("allinone.evaluate.suites", "EvalError"),
    ("allinone.evaluate.testsets", "EvalDataError"),
    ("allinone.models.checkpoint", "CheckpointError"),
    ("allinone.models.importer", "CheckpointImportError"),
    ("allinone.tracking.report", "ReportError"),
    ("allinone.tracking.resolve", "ResolveError"),
    ("allinone.tracking.runs", "TrackingError"),
    ("allinone.tune.study", "StudyError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    loaded = sys.modules
    stage_errors = (getattr(loaded[m], name) for m, name in _STAGE_ERRORS if m in loaded)
    return (*USER_ERRORS, *stage_errors)


app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help=__doc__.splitlines()[0],
)
shards_app = typer.Typer(no_args_is_help=True, help="Build and verify WebDataset shards.")
models_app = typer.Typer(no_args_is_help=True, help="The model zoo.")
config_app = typer.Typer(no_args_is_help=True, help="Validate task and pipeline configs.")
app.add_typer(shards_app, name="shards")
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")
data_app = typer.Typer(no_args_is_help=True, help="Datasets as they download.")
app.add_typer(data_app, name="data")

console = Console()
errors = Console(stderr=True)


def main() -> None:
    try:
        app()
    except _user_errors() as err:
        errors.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)


# --------------------------------------------------------------------------- shards
MaxPixels = Annotated[
    int,
    typer.Option(min=1, help="Refuse images of more pixels (width x height) before decoding"),
]


SampleSteps = Annotated[
    int | None,
    typer.Option(min=1, help="DDIM steps of a sampling model (perceiver); default: its own"),
]
SamplingSeed = Annotated[
    int | None,
    typer.Option(help="Sampling seed of a sampling model: the same seed, the same image"),
]


@shards_app.command("build")
def shards_build(
    task_yaml: Annotated[Path, typer.Argument(help="A task config, e.g. tasks/denoise.yaml")],
    out: Annotated[
        str, typer.Option(help="Folder (or s3://bucket/prefix) for this task split's shards")
    ],
    source: Annotated[
        str | None,
        typer.Option(help="'skimage', a folder of clean images, or a paired dataset's root"),
    ] = None,
    split: Annotated[str, typer.Option(help="train or test")] = "train",
    samples_per_shard: Annotated[int, typer.Option(min=1)] = 64,
    seed: Annotated[int, typer.Option()] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Shards built in parallel")] = 1,
    skip_bad: Annotated[bool, typer.Option(help="Record refused files and go on")] = False,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    address: Annotated[
        str | None,
        typer.Option(
            help="Build on this Ray cluster, one task per shard (sources readable on every node)"
        ),
    ] = None,
) -> None:
    """Degrade (or pair) a task's images into WebDataset shards plus a manifest.json."""
    from allinone.cli.progress import build_with_progress
    from allinone.data import storage
    from allinone.data.shards import BuildRequest

    if split not in ("train", "test"):
        raise typer.BadParameter("must be 'train' or 'test'", param_hint="--split")
    task = load_task(task_yaml)
    source = _source(task_yaml, task, split, source)
    folder = storage.path(out)
    storage.check(folder)
    request = BuildRequest(
        task, split, source, folder, samples_per_shard, seed, skip_bad, max_pixels
    )
    if address:
        from allinone.cluster.ray import start_ray

        start_ray(address)
    manifest = build_with_progress(request, workers, console, on_ray=bool(address))
    console.print(
        f"{manifest['samples']} samples in {len(manifest['shards'])} shards -> {out}"
        + (f"; {len(manifest['skipped'])} files skipped" if manifest["skipped"] else "")
    )


def _source(task_yaml: Path, task, split: str, given: str | None) -> str:
    if given is not None:
        return str(resolve_source(given, Path.cwd(), "--source", "--source"))
    configured = task.split(split).source
    if configured is None:
        raise ConfigError(task_yaml, f"{split}.source", "no source configured: pass --source DIR")
    return str(resolve_source(configured, task_yaml.resolve().parent, task_yaml, f"{split}.source"))


@shards_app.command("verify")
def shards_verify(
    folder: Annotated[
        str, typer.Argument(help="A shard folder or s3://bucket/prefix (searched recursively)")
    ],
) -> None:
    """Re-check counts, sha256 hashes, and that every sample decodes into an equal-size pair."""
    from allinone.data import storage
    from allinone.data.shards import verify_shards

    report = verify_shards(storage.path(folder))
    for problem in report.problems:
        errors.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    console.print(
        f"{report.manifests} manifests, {report.shards} shards, {report.samples} samples: "
        + ("[red]FAILED[/]" if report.problems else "[green]OK[/]")
    )
    if report.problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- models
@models_app.command("list")
def models_list() -> None:
    """Every model with its presets, parameter counts and, for the published networks, the
    official count and whether the authors' released weights import."""
    from allinone.models import MODELS, parameter_counts

    table = Table("model", "preset", "parameters", "trainable", "official", "weights import")
    for name, entry in sorted(MODELS.items()):
        for preset in entry.presets:
            total, trainable = parameter_counts(name, preset)
            official = entry.official
            official = official if official and official.preset == preset else None
            table.add_row(
                name,
                preset,
                f"{total:,}",
                f"{trainable:,}",
                f"{official.parameters:,}" if official else "",
                _imports(official) if official else "",
            )
    console.print(table)


def _imports(official) -> str:
    return "yes" if official.weights else "none released"


@models_app.command("import")
def models_import(
    arch: Annotated[str, typer.Argument(help="A published architecture, e.g. promptir")],
    checkpoint: Annotated[Path, typer.Argument(help="The authors' released file")],
    out: Annotated[Path, typer.Option(help="Our checkpoint file to write, e.g. promptir.pt")],
    preset: Annotated[
        str | None, typer.Option(help="Default: the preset of the official release")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="mioir_explicit: the repository's data/type7.npy prompt maps"),
    ] = None,
    classifier: Annotated[
        Path | None,
        typer.Option(help="mioir_explicit: its separately released Classifier.pth"),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="The tasks it was trained on, comma-separated (for eval and --task)"),
    ] = None,
    register: Annotated[
        str | None, typer.Option(help="Also register it in MLflow under this name")
    ] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Turn an official released checkpoint into our checkpoint file, which every --model takes."""
    from allinone.models.checkpoint import Checkpoint, save_checkpoint
    from allinone.models.importer import classifier_weights, import_official, prompt_maps

    extra = {
        **(prompt_maps(arch, prompts) if prompts else {}),
        **(classifier_weights(arch, classifier) if classifier else {}),
    }
    imported = import_official(arch, checkpoint, preset, extra or None)
    if tasks:
        spec = imported.spec.with_tasks(tuple(t.strip() for t in tasks.split(",") if t.strip()))
        imported = Checkpoint(spec, imported.state_dict, imported.provenance)
    imported.build()  # the task names fit the network (per-task prompts), or one line says why
    save_checkpoint(out, imported)
    console.print(
        f"imported {arch} ({imported.spec.preset}) from {checkpoint} -> {out}", highlight=False
    )
    if register:
        from allinone.tracking.registry import register_checkpoint

        console.print(register_checkpoint(imported, register, tracking_uri).line(), highlight=False)


# --------------------------------------------------------------------------- data
@data_app.command("check")
def data_check(
    folder: Annotated[Path, typer.Argument(help="A folder of datasets, e.g. BSD400/, Rain100L/")],
) -> None:
    """Per task, the standard datasets found (BSD400, WED, RainTrainL, Rain100L, OTS, ITS, SOTS,
    GoPro, LOL, DIV2K, Flickr2K, ...): pairs, sizes, unpaired and unreadable files."""
    from allinone.evaluate.inventory import check_data

    surveys = check_data(folder)
    for task in sorted({survey.tasks[0] for survey in surveys if survey.tasks}):
        console.print(f"[bold]{task}[/]", highlight=False)
        for survey in (s for s in surveys if s.tasks[:1] == (task,)):
            console.print(f"  {_survey_line(survey)}", highlight=False, soft_wrap=True)
    others = [s for s in surveys if not s.tasks]
    if others:
        console.print("[bold]other image folders[/] (no known dataset)")
        for survey in others:
            console.print(f"  {_survey_line(survey)}", highlight=False, soft_wrap=True)
    problems = [p for survey in surveys for p in survey.problems]
    for problem in problems[:20]:
        errors.print(
            f"{problem.file}: {problem.reason}", highlight=False, markup=False, soft_wrap=True
        )
    if len(problems) > 20:
        errors.print(f"... and {len(problems) - 20} more", highlight=False)
    if problems:
        raise typer.Exit(1)


def _survey_line(survey) -> str:
    unit = f"{survey.layout} pairs" if survey.layout != "clean" else "images"
    unit = f"clean {unit}" if survey.tasks and survey.layout == "clean" else unit
    sizes = (
        f", {survey.smallest[0]}x{survey.smallest[1]} .. {survey.largest[0]}x{survey.largest[1]}"
        if survey.smallest and survey.largest
        else ""
    )
    notes = [
        f"{len(survey.unpaired)} unpaired" if survey.unpaired else "",
        f"{len(survey.unreadable)} unreadable" if survey.unreadable else "",
        f"{survey.mismatched} pairs of unequal sizes" if survey.mismatched else "",
    ]
    notes.append(f"also for {', '.join(survey.tasks[1:])}" if survey.tasks[1:] else "")
    split = f" ({survey.split})" if survey.split else ""
    extra = "".join(f", {n}" for n in notes if n)
    return f"{survey.name}{split}: {survey.count} {unit}{sizes}{extra}  {survey.root}"


# --------------------------------------------------------------------------- configs
@config_app.command("check")
def config_check(
    paths: Annotated[list[Path], typer.Argument(help="Task or pipeline YAML files")],
    inputs: Annotated[
        bool,
        typer.Option(help="Also check, here, the data folders and weights a pipeline reads"),
    ] = False,
) -> None:
    """Validate configs; a file with a ``kind`` field is a task, one with ``curriculum`` or
    ``model`` a pipeline, wherever it lives."""
    from allinone.config import load_yaml

    for path in paths:
        data = load_yaml(path)
        if "kind" in data:
            load_task(path)
        elif "curriculum" in data or "model" in data:
            pipeline = load_pipeline(path)
            if inputs:
                from allinone.curriculum.run import check_inputs

                check_inputs(pipeline)
        else:
            raise ConfigError(
                path,
                "",
                "neither a task (no 'kind' field) nor a pipeline (no 'curriculum' or 'model')",
            )
        console.print(f"{path}: [green]ok[/]")


# --------------------------------------------------------------------------- running
LocalTrackingUri = Annotated[
    str | None, typer.Option(help="Default: sqlite:///<workdir>/mlflow.db")
]
RayAddress = Annotated[str | None, typer.Option(help="Ray cluster address; default: local Ray")]
Storage = Annotated[
    str | None,
    typer.Option(
        help="Checkpoints: a folder or s3://bucket/prefix every node reaches; "
        "default: train.storage, else <workdir>/ray"
    ),
]


Verbose = Annotated[
    bool,
    typer.Option(help="Show every library's warnings and Ray's worker output, not only progress"),
]


@app.command("run")
def run(
    pipeline_yaml: Annotated[
        Path, typer.Argument(help="A pipeline, e.g. pipelines/quickstart.yaml")
    ],
    workdir: Annotated[Path | None, typer.Option(help="Default: ./runs/<pipeline name>")] = None,
    tracking_uri: LocalTrackingUri = None,
    address: RayAddress = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --workdir")] = False,
    verbose: Verbose = False,
    storage: Storage = None,
) -> None:
    """Run a whole curriculum: shards, stages, evaluation, registration."""
    from allinone.cli.closing import finish_run, stages_of
    from allinone.cli.console import run_console
    from allinone.curriculum.run import run_pipeline
    from allinone.curriculum.state import RunOptions

    pipeline = load_pipeline(pipeline_yaml)
    options = RunOptions(
        workdir or Path("runs") / pipeline.config.name,
        tracking_uri,
        address,
        resume,
        storage=storage,
    )
    with run_console(console, options.workdir.resolve(), verbose, stages_of(pipeline)) as screen:
        summary = run_pipeline(pipeline, options, say=screen.say)
    finish_run(console, summary, pipeline, screen.log_path)


# --------------------------------------------------------------------------- tuning
@app.command("tune")
def tune(
    pipeline_yaml: Annotated[Path, typer.Argument(help="A pipeline with a tune: block")],
    workdir: Annotated[
        Path | None, typer.Option(help="Default: ./runs/<pipeline name>-tune")
    ] = None,
    tracking_uri: LocalTrackingUri = None,
    address: RayAddress = None,
    resume: Annotated[bool, typer.Option(help="Continue the study in --workdir")] = False,
    verbose: Verbose = False,
    storage: Storage = None,
) -> None:
    """Search the pipeline's tune: space with Ray Tune; register the best trial's model."""
    from allinone.cli.closing import finish_study
    from allinone.cli.console import run_console
    from allinone.tracking.runs import default_tracking_uri
    from allinone.tune.study import StudyOptions, run_study, table_rows

    pipeline = load_pipeline(pipeline_yaml)
    options = StudyOptions(
        workdir or Path("runs") / f"{pipeline.config.name}-tune",
        tracking_uri,
        address,
        resume,
        storage,
    )
    folder = options.workdir.resolve()
    with run_console(console, folder, verbose) as screen:
        result = run_study(pipeline, options, say=screen.say)
    header, *body = table_rows(result)
    table = Table(*header, title=f"{len(body)} trials, {result.trial_steps} curriculum steps")
    for row in body:
        table.add_row(*row)
    console.print(table)
    best = result.best()
    if best is None:
        errors.print("no trial completed its curriculum: nothing registered", highlight=False)
        raise typer.Exit(1)
    console.print(f"best: trial {best.trial}, {result.metric} {best.metric:.3f}", highlight=False)
    uri = tracking_uri or default_tracking_uri(folder)
    finish_study(console, result, pipeline, folder, uri, screen.log_path)


# --------------------------------------------------------------------------- cluster jobs
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs submitted to a Ray cluster.")
app.add_typer(jobs_app, name="jobs")

Address = Annotated[
    str | None,
    typer.Option(
        help="The cluster's dashboard, e.g. http://HEAD:8265; default: $RAY_API_SERVER_ADDRESS, "
        "then $RAY_ADDRESS, then the last address a submit or jobs command reached"
    ),
]


@app.command("submit")
def submit(
    pipeline_yaml: Annotated[Path, typer.Argument(help="A pipeline inside this project")],
    address: Address = None,
    workdir: Annotated[
        str | None,
        typer.Option(
            help="On the cluster; absolute on storage every node mounts for multi-node runs. "
            "Default: runs/<job id> in the job's own (scratch) working directory"
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow server the job logs to; default: SQLite in the job's workdir"),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE for the job, repeatable, e.g. ALLINONE_DATA=/mnt/data"),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the logs until the job ends")] = True,
    tune: Annotated[
        bool, typer.Option("--tune", help="Run the pipeline's tune: study (`allinone tune`)")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Run a pipeline (or, with --tune, its study) on a Ray cluster through the Ray Jobs API.
    The pipeline's data folders are checked on the cluster before the job is queued."""
    from allinone.cluster import jobs as cluster
    from allinone.tune.study import StudyError

    pipeline = load_pipeline(pipeline_yaml)
    if tune and pipeline.config.tune is None:
        raise StudyError(f"{pipeline_yaml}: --tune needs a tune: block in the pipeline")
    verb = "tune" if tune else "run"
    client = cluster.connect(address)
    request = cluster.Submission(
        pipeline, workdir, tracking_uri, _job_env(env or []), verb, verbose
    )
    job_id = cluster.submit(client, request, exists_here=lambda: _inputs_here(pipeline))
    console.print(
        f"submitted job {job_id} to {client.get_address()}\n"
        f"  status: allinone jobs status {job_id}\n"
        f"  logs:   allinone jobs logs {job_id} --follow",
        highlight=False,
        soft_wrap=True,
    )
    if wait:
        _follow(client, job_id)


def _inputs_here(pipeline) -> bool:
    """Whether the pipeline's data folders and weights are found on this machine."""
    from allinone.curriculum.run import check_inputs

    try:
        check_inputs(pipeline)
    except USER_ERRORS:
        return False
    return True


def _job_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--env")
        env[key] = value
    return env


def _follow(client, job_id: str) -> None:
    from allinone.cluster import jobs as cluster

    try:
        info = cluster.follow(client, job_id)
    except KeyboardInterrupt:
        errors.print(
            f"stopped following; job {job_id} goes on (allinone jobs stop {job_id} to end it)",
            highlight=False,
        )
        raise typer.Exit(130) from None
    console.print(
        f"job {job_id}: {_status_line(info)}", highlight=False, markup=False, soft_wrap=True
    )
    if str(info.status) != "SUCCEEDED":
        raise typer.Exit(1)


@jobs_app.command("status")
def jobs_status(
    job_id: Annotated[str, typer.Argument(help="A submission id")], address: Address = None
) -> None:
    """A job's status and Ray's message about it."""
    from allinone.cluster import jobs as cluster

    info = cluster.job_info(cluster.connect(address), job_id)
    console.print(f"{job_id}: {_status_line(info)}", highlight=False, markup=False, soft_wrap=True)


def _status_line(info) -> str:
    # A failed job's message ends with the last 20,000 characters of its logs: keep its first line.
    message = (info.message or "").strip().splitlines()
    return f"{info.status} ({message[0].rstrip(':,')})" if message else str(info.status)


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="A submission id")],
    address: Address = None,
    follow: Annotated[bool, typer.Option(help="Stream until the job ends")] = False,
) -> None:
    """A job's driver output so far, or streamed until it ends with --follow."""
    from allinone.cluster import jobs as cluster

    client = cluster.connect(address)
    if follow:
        _follow(client, job_id)
    else:
        sys.stdout.write(cluster.job_logs(client, job_id))


@jobs_app.command("list")
def jobs_list(address: Address = None) -> None:
    """Every job the cluster knows, oldest first."""
    from rich.markup import escape

    from allinone.cluster import jobs as cluster

    table = Table()
    for name in ("job", "status", "started"):  # whole, so that an id can be copied
        table.add_column(name, no_wrap=True)
    table.add_column("entrypoint")
    for job in cluster.list_jobs(cluster.connect(address)):
        table.add_row(
            job.submission_id or job.job_id or "?",
            str(job.status),
            _time_of(job.start_time),
            escape(job.entrypoint),
        )
    console.print(table)


def _time_of(epoch_ms: int | None) -> str:
    import datetime as dt

    if not epoch_ms:
        return ""
    return dt.datetime.fromtimestamp(epoch_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


@jobs_app.command("stop")
def jobs_stop(
    job_id: Annotated[str, typer.Argument(help="A submission id")], address: Address = None
) -> None:
    """Ask the cluster to stop a job."""
    from allinone.cluster import jobs as cluster

    stopped = cluster.stop_job(cluster.connect(address), job_id)
    console.print(f"{job_id}: " + ("stopping" if stopped else "had already ended"), highlight=False)


# --------------------------------------------------------------------------- evaluation
@app.command("eval")
def eval_model(
    model: Annotated[
        str,
        typer.Option(
            help="A run id, a checkpoint path, a registry URI (models:/allinone@champion), "
            "or 'latest' (the model of the last run started here)"
        ),
    ],
    suite: Annotated[
        str, typer.Option(help="all-in-one, zero-shot, few-shot or all")
    ] = "all-in-one",
    tasks: Annotated[
        list[str] | None, typer.Option(help="Only these tasks (repeatable, or comma-separated)")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Folder of standard test sets (CBSD68, Rain100L, SOTS, GoPro, LOL)"),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow store to resolve the model in and log results to; default: "
            "$MLFLOW_TRACKING_URI, else the last run's store (runs/latest.json)"
        ),
    ] = None,
    baselines: Annotated[
        bool, typer.Option(help="Also score classical methods (TV, NLM, dark channel)")
    ] = False,
    max_images: Annotated[int | None, typer.Option(min=1, help="Per test set")] = None,
    tile: Annotated[
        int | None, typer.Option(min=32, help="Restore larger images in tiles of this size")
    ] = None,
    k: Annotated[list[int] | None, typer.Option(min=1, help="Few-shot pairs (repeatable)")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Few-shot fine-tuning steps")] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help="Few-shot learning rate")] = None,
    tasks_dir: Annotated[
        Path | None, typer.Option(help="Task configs; default: this project's tasks/")
    ] = None,
    sample_steps: SampleSteps = None,
    seed: SamplingSeed = None,
) -> None:
    """Score a model: all-in-one on its trained tasks, zero-/few-shot on unseen ones."""
    from allinone.cli import stores
    from allinone.evaluate import suites as ev
    from allinone.tracking.resolve import resolve_model

    if suite not in ev.SUITE_CHOICES:
        raise ev.EvalError(
            f"--suite: unknown suite {suite!r} (known: {', '.join(ev.SUITE_CHOICES)})"
        )
    model = stores.model_ref(model)
    tracking_uri = stores.tracking_uri_for(tracking_uri, model)
    resolved = resolve_model(model, tracking_uri)
    resolved.configure_sampling(sample_steps, seed)
    plan = _eval_plan(resolved, data, baselines, max_images, tile, tasks_dir, k, steps, lr)
    requested = [t for item in tasks or [] for t in item.split(",") if t] or None
    plan.say = lambda line: errors.print(line, highlight=False, markup=False)
    results = ev.run_suites(plan, [suite], requested)
    if tracking_uri:
        _log_eval(results, tracking_uri, model, suite, resolved.run_id)
    _print_results(results)


def _eval_plan(resolved, data, baselines, max_images, tile, tasks_dir, k, steps, lr):
    from allinone.config import EvalSection, FewShotSection
    from allinone.evaluate.suites import EvalPlan, default_tasks_dir, load_catalog

    config = resolved.pipeline
    settings = config.eval if config else EvalSection()
    overrides = {name: v for name, v in {"k": k, "steps": steps, "lr": lr}.items() if v}
    few_shot = FewShotSection(**(settings.few_shot.model_dump() | overrides))

    return EvalPlan(
        model=resolved.module,
        trained=tuple(resolved.task_names),
        catalog=load_catalog(tasks_dir or default_tasks_dir()),
        fresh=config.model_spec.build if config else None,
        data=data,
        seed=config.seed if config else 0,
        max_images=max_images or settings.max_images,
        tile=tile or settings.tile,
        baselines=baselines,
        few_shot=few_shot,
        unseen_tasks=tuple(config.unseen_tasks) if config and config.unseen_tasks else None,
    )


def _log_eval(results, tracking_uri: str, model_ref: str, suite: str, source: str | None):
    import mlflow

    from allinone.evaluate.suites import log_results
    from allinone.tracking import runs as tracking
    from allinone.tracking.report import EVAL_EXPERIMENT, SOURCE_TAG

    experiment = tracking.connect(tracking_uri, EVAL_EXPERIMENT)
    with tracking.run(None, experiment, f"eval {suite}") as run_id:
        mlflow.log_params({"model": model_ref, "suite": suite})
        if source:  # the report of the run that made the model links this evaluation
            mlflow.set_tag(SOURCE_TAG, source)
        log_results(results, run_id=run_id)
    console.print(f"logged to MLflow run {run_id} ({tracking_uri})", highlight=False)


def _print_results(results) -> None:
    from allinone.cli.closing import results_tables

    for table in results_tables(results):
        console.print(table)
    for note in results.notes:
        console.print(note, highlight=False, markup=False)
    for name, value in results.averages().items():
        console.print(f"{name}: average PSNR {value:.2f} dB", highlight=False)


# ------------------------------------------------------------------ registry, restore, report
TrackingUri = Annotated[
    str | None,
    typer.Option(
        help="MLflow store of the run or registry; default: $MLFLOW_TRACKING_URI, else the last "
        "run's store (runs/latest.json), else the only runs/*/mlflow.db"
    ),
]


@app.command("register")
def register(
    run_id: Annotated[str, typer.Option(help="A finished curriculum (parent) run")],
    name: Annotated[str, typer.Option(help="Registered model name")] = "allinone",
    tracking_uri: TrackingUri = None,
) -> None:
    """Register a finished run's model; it becomes @champion only if it beats the champion."""
    from allinone.cli import stores
    from allinone.tracking.registry import register_run

    uri = stores.tracking_uri_for(tracking_uri)
    console.print(register_run(run_id, uri, name).line(), highlight=False)


@app.command("restore")
def restore(
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images")],
    model: Annotated[
        str, typer.Option(help="A run id, a checkpoint path, a registry URI, or 'latest'")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the restored PNGs")],
    task: Annotated[
        str, typer.Option(help="'auto' (the model decides) or a task the model was trained on")
    ] = "auto",
    tile: Annotated[
        int | None, typer.Option(min=32, help="Restore larger images in tiles of this size")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs")] = False,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    tracking_uri: TrackingUri = None,
    sample_steps: SampleSteps = None,
    seed: SamplingSeed = None,
) -> None:
    """Restore images of any size with a trained model; unreadable files are skipped."""
    from allinone.cli import stores
    from allinone.cli.restore import RestoreJob, restore_images
    from allinone.tracking.resolve import resolve_model

    job = RestoreJob.plan(inputs, out, task, tile, overwrite, max_pixels)
    model = stores.model_ref(model)
    resolved = resolve_model(model, stores.tracking_uri_for(tracking_uri, model))
    resolved.configure_sampling(sample_steps, seed)
    report = restore_images(resolved, job, console)
    for path, reason in report.failed:
        errors.print(f"skipped {path}: {reason}", highlight=False, markup=False, soft_wrap=True)
    console.print(
        f"{len(report.written)} restored -> {out}"
        + (f"; {len(report.failed)} failed" if report.failed else ""),
        highlight=False,
    )
    if report.failed:
        raise typer.Exit(1)


@app.command("report")
def report(
    run: Annotated[
        str,
        typer.Argument(
            help="A curriculum (parent) run id, a model URI (models:/allinone@champion: the run "
            "that logged it), or 'latest' (the last run started here)"
        ),
    ],
    out: Annotated[Path, typer.Option(help="The HTML page to write")] = Path("report.html"),
    tracking_uri: TrackingUri = None,
) -> None:
    """One self-contained HTML page of a run: the real test sets beside the baselines, the run's
    facts, restorations, the stage matrix, training curves and config."""
    from allinone.cli import stores
    from allinone.tracking.report import write_report

    ref = stores.run_ref(run)
    write_report(ref, out, stores.tracking_uri_for(tracking_uri))
    console.print(f"report of {ref} -> {out}", highlight=False)
