"""What ``run``, ``tune`` and ``submit`` end with, and the tables ``eval`` prints.

The closing block names the run, its work folder, its tracking store and its registered model,
shows the real test sets' headline table when the run was scored on them, and gives the commands
to go on with (``eval``, ``restore``, ``report``, ``mlflow ui``), ready to paste: a command carries
``--tracking-uri`` only when, run from here, it would not find the store by itself. Every table
fits 80 columns without cutting a set's name.
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table

from allinone.cli import stores
from allinone.cli.console import shown_path
from allinone.cluster.jobs import JOB_VARIABLE
from allinone.config import Pipeline
from allinone.curriculum.plan import plan_stages
from allinone.curriculum.scoring import eval_data
from allinone.evaluate.headline import LABELS, Headline, headline, headline_table
from allinone.evaluate.suites import Results, Row, few_shot_table
from allinone.evaluate.testsets import LAYOUT_DIRS, discover
from allinone.tracking.report import UI, read_results, record_facts

if TYPE_CHECKING:  # the run and the study bring Ray and Tune: `allinone eval` needs neither
    from allinone.curriculum.run import RunSummary, RunTiming
    from allinone.tune.study import StudyResult


@dataclass(frozen=True)
class Closing:
    """What a finished run (or a study's best trial) left, for its closing block."""

    title: str
    run_id: str
    workdir: Path
    tracking_uri: str
    model: str | None  # the registered version's models:/ URI
    model_note: str | None  # its alias and why, e.g. "@champion (first model)"
    headline: list[Headline]
    data: Path | None  # the real test sets it was scored on
    photos: Path | None  # degraded real photos to try `restore` on
    log: Path | None  # the quiet console's log
    time: str | None = None  # where the run's time went (timing_line)

    def commands(self) -> list[tuple[str, str]]:
        store = _store_flag(self.tracking_uri)
        model = self.model or self.run_id
        data = f" --data {_arg(self.data)} --baselines" if self.data else ""
        photos = _arg(self.photos) if self.photos else "PHOTOS/"
        ui = (
            f"mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)}   # then {UI}"
            if not self.tracking_uri.startswith(("http://", "https://"))
            else f"open {self.tracking_uri} in a browser"
        )
        return [
            ("evaluate", f"allinone eval --model {model}{data}{store}"),
            ("restore", f"allinone restore --model {model} {photos} --out restored/{store}"),
            ("report", f"allinone report {self.run_id} --out report.html{store}"),
            ("browse", ui),
        ]


def print_closing(console: Console, closing: Closing) -> None:
    console.rule(closing.title)
    facts = [
        ("run id", closing.run_id),
        ("work folder", shown_path(closing.workdir)),
        ("tracking URI", closing.tracking_uri),
        ("model", f"{closing.model} {closing.model_note or ''}".strip() if closing.model else ""),
        ("full log", shown_path(closing.log) if closing.log else ""),
        ("time", closing.time or ""),
    ]
    for label, value in facts:  # one line each, never wrapped: a URI stays pasteable
        if value:
            console.print(f"{label:<14}{value}", highlight=False, markup=False, soft_wrap=True)
    for note in _job_notes(closing.tracking_uri):
        console.print(note, highlight=False, soft_wrap=True)
    if closing.headline:
        console.print(headline_rich(closing.headline))
    console.print("next:", style="bold")
    for what, command in closing.commands():
        console.print(f"  {what:<9}{command}", highlight=False, markup=False, soft_wrap=True)


def _job_notes(tracking_uri: str) -> list[str]:
    job = os.environ.get(JOB_VARIABLE)
    if not job:
        return []
    notes = [f"ran as Ray job {job}: the work folder is on the cluster's head node"]
    if not tracking_uri.startswith(("http://", "https://")):
        notes.append(
            "its tracking store is in the job's scratch folder there: submit with "
            "--tracking-uri http://MLFLOW_HOST:5000 to keep the results where you can reach them"
        )
    return notes


def _store_flag(uri: str) -> str:
    try:
        found = stores.tracking_uri(None)
    except stores.StoreError:
        found = None
    return "" if found == uri else f" --tracking-uri {shlex.quote(uri)}"


def _arg(path: Path) -> str:
    return shlex.quote(shown_path(path))


def photos_to_restore(data: Path | None, tasks: list[str]) -> Path | None:
    """The degraded photos of the first real paired test set of a trained task (Rain100L's
    rain/, SOTS's hazy/): real photos that `restore` shows the model on."""
    if data is None or not data.is_dir():
        return None
    for found in discover(data).found:
        if found.layout in LAYOUT_DIRS and set(found.standard.tasks) & set(tasks):
            return found.root / LAYOUT_DIRS[found.layout][0]
    return None


# --------------------------------------------------------------------------- tables
def _table(title: str | None, header: list[str], first_left: int = 1) -> Table:
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title_justify="left",
    )
    for i, name in enumerate(header):
        left = i < first_left
        table.add_column(name, justify="left" if left else "right", no_wrap=left)
    return table


def headline_rich(lines: list[Headline]) -> Table:
    header, body = headline_table(lines)
    table = _table(
        "Real test sets: PSNR (dB), margin over the strongest method or the input", header
    )
    for row in body:
        table.add_row(*row)
    return table


def _suite_table(suite: str, rows: list[Row]) -> Table:
    """A suite's rows under a line per task, a set named once above its methods: a set's name
    keeps its whole width (synthetic-length15-angle45) inside 80 columns."""
    header = ["task / set", "method", "n", "PSNR", "SSIM", "PSNR-Y", "SSIM-Y", "s/img"]
    table = _table(suite, header, first_left=2)
    shown = (None, None)
    for r in rows:
        if r.task != shown[0]:
            table.add_row(r.task, style="bold")
        name = f"  {r.set}" if (r.task, r.set) != shown else ""
        shown = (r.task, r.set)
        table.add_row(
            name,
            LABELS.get(r.method, r.method),
            str(r.images),
            f"{r.psnr:.2f}",
            f"{r.ssim:.4f}",
            f"{r.psnr_y:.2f}",
            f"{r.ssim_y:.4f}",
            "-" if math.isnan(r.seconds) else f"{r.seconds:.2f}",
        )
    return table


def results_tables(results: Results) -> list[Table]:
    """``allinone eval``'s tables: the headline first when baselines were scored, then per suite
    every row, then the few-shot pivot."""
    tables = []
    lines = headline(results.rows)
    if any(line.baselines for line in lines):
        tables.append(headline_rich(lines))
    for suite in dict.fromkeys(r.suite for r in results.rows if r.suite != "few-shot"):
        tables.append(_suite_table(suite, [r for r in results.rows if r.suite == suite]))
    shots = few_shot_table(results)
    if shots:
        pivot = _table(
            "Few-shot PSNR (dB) on held-out pairs",
            ["task", "set", "k", "steps", "zero-shot", "few-shot", "scratch"],
            first_left=2,
        )
        for task, name, k, steps, zero, tuned, scratch in shots:
            pivot.add_row(
                task, name, str(k), str(steps), f"{zero:.2f}", f"{tuned:.2f}", f"{scratch:.2f}"
            )
        tables.append(pivot)
    return tables


# --------------------------------------------------------------------------- finishing
def timing_line(timing: RunTiming) -> str:
    """``7.6 min (stage start-ups: 14 + 12 + 12 s, fit() to first step)``: the whole attempt,
    and what each stage paid before it trained."""
    line = f"{timing.wall_s / 60:.1f} min"
    if timing.startups:
        each = " + ".join(f"{s:.0f}" for s in timing.startups.values())
        line += f" (stage start-ups: {each} s, fit() to first step)"
    return line


def stages_of(pipeline: Pipeline) -> list[tuple[str, int]]:
    """The curriculum's stages and their steps, for the progress bars."""
    return [(stage.name, stage.steps) for stage in plan_stages(pipeline)]


def finish_run(console: Console, summary: RunSummary, pipeline: Pipeline, log: Path | None):
    """The end of ``allinone run``: the run's facts recorded, ``latest.json`` pointed at it, the
    stage matrix and the closing block printed."""
    space = summary.workspace
    if summary.run_id:
        record_facts(summary.run_id, space.tracking_uri, _parameters(pipeline))
    console.print(matrix_table(summary))
    registered = summary.registered
    closing = Closing(
        title=f"{pipeline.config.name}: finished",
        run_id=summary.run_id,
        workdir=space.folder,
        tracking_uri=space.tracking_uri,
        model=registered.uri if registered else None,
        model_note=f"@{registered.alias} ({registered.reason})" if registered else None,
        headline=headline(summary.results.rows) if summary.results else [],
        data=_eval_data(pipeline),
        photos=photos_to_restore(_eval_data(pipeline), list(pipeline.config.tasks)),
        log=log,
        time=timing_line(summary.timing) if summary.timing else None,
    )
    _point_latest(closing, pipeline)
    print_closing(console, closing)


def finish_study(
    console: Console,
    result: StudyResult,
    pipeline: Pipeline,
    workdir: Path,
    tracking_uri: str,
    log: Path | None,
) -> None:
    """The end of ``allinone tune``: the closing block of the best completed trial's run."""
    best = result.best()
    if best is None or not best.run_id:
        return
    registered = result.registered
    closing = Closing(
        title=f"{pipeline.config.name} study: best trial {best.trial}",
        run_id=best.run_id,
        workdir=workdir,
        tracking_uri=tracking_uri,
        model=registered.uri if registered else None,
        model_note=f"@{registered.alias} ({registered.reason})" if registered else None,
        headline=headline(read_results(best.run_id, tracking_uri)),
        data=_eval_data(pipeline),
        photos=photos_to_restore(_eval_data(pipeline), list(pipeline.config.tasks)),
        log=log,
    )
    _point_latest(closing, pipeline)
    print_closing(console, closing)


def matrix_table(summary: RunSummary) -> Table:
    tasks = list(summary.tasks)
    table = _table(
        "PSNR (dB) on each task's synthetic test split after each stage",
        ["stage", *tasks, "average"],
    )
    for stage, scores in summary.matrix.items():
        values = [scores[t] for t in tasks]
        table.add_row(stage, *(f"{v:.2f}" for v in values), f"{sum(values) / len(values):.2f}")
    return table


def _point_latest(closing: Closing, pipeline: Pipeline) -> None:
    stores.write_latest(
        stores.LatestRun(
            closing.run_id,
            str(closing.workdir),
            closing.tracking_uri,
            closing.model,
            pipeline.config.name,
        )
    )


def _eval_data(pipeline: Pipeline) -> Path | None:
    return eval_data(pipeline) if pipeline.config.eval.data else None


def _parameters(pipeline: Pipeline) -> int:
    return sum(p.numel() for p in pipeline.config.model_spec.build().parameters())
