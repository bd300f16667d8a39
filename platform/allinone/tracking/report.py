"""``allinone report RUN_ID``: one self-contained HTML page of a curriculum run.

Everything comes from MLflow, so a run on a cluster reports the same as a local one: the config
(``config/pipeline.json``), a per-task table of the last stage's test scores, the task x stage
PSNR matrix (table and heatmap), the training loss of every stage, every metric of the run, and
the sample grids under ``grids/`` of the run and its stages. Pictures are inlined as base64 PNGs:
the page is one file that opens anywhere, with nothing to fetch.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from allinone.base.files import write_atomic
from allinone.evaluate.continual import StageMatrix, heatmap_png
from allinone.evaluate.grids import GRIDS_DIR

SCORE_COLUMNS = (("psnr", "PSNR"), ("ssim", "SSIM"), ("psnr_y", "PSNR-Y"), ("ssim_y", "SSIM-Y"))
SCORE_COLUMNS += (("input_psnr", "input PSNR"),)


class ReportError(ValueError):
    """A run that cannot be reported; the message names it."""


@dataclass(frozen=True)
class RunData:
    """What the page shows, read from MLflow."""

    run: Any  # mlflow.entities.Run, the curriculum's parent run
    stages: list[Any]  # its stage runs, in stage order
    config: dict[str, Any] | None
    losses: dict[str, list[tuple[int, float]]]  # stage name -> (step, train/loss)
    grids: list[tuple[str, bytes]]  # (caption, PNG)

    @property
    def tasks(self) -> list[str]:
        if self.config:
            return list(self.config["tasks"])
        names = {k.split("/")[1] for s in self.stages for k in s.data.metrics if _is_score(k)}
        return sorted(names)


def _is_score(metric: str) -> bool:
    return metric.startswith("test/") and metric.endswith("/psnr") and metric.count("/") == 2


def write_report(run_id: str, out: Path, tracking_uri: str | None = None) -> Path:
    page = render(read_run(run_id, tracking_uri))
    return write_atomic(out, page)


# --------------------------------------------------------------------------- reading MLflow
def read_run(run_id: str, tracking_uri: str | None = None) -> RunData:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per grid
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ReportError(f"run {run_id} not found in {mlflow.get_tracking_uri()}") from None
    stages = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    stages.sort(key=lambda s: (int(s.data.params.get("stage.index", 0)), s.info.start_time))
    losses = {
        s.info.run_name: [
            (m.step, m.value) for m in client.get_metric_history(s.info.run_id, "train/loss")
        ]
        for s in stages
    }
    # Stage runs first: the parent repeats the last stage's grids, and a picture is shown once.
    grids = _distinct([g for r in [*stages, run] for g in _grids(client, r)])
    return RunData(run, stages, _config(run_id), losses, grids)


def _config(run_id: str) -> dict[str, Any] | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/config/pipeline.json")
    except (MlflowException, OSError):
        return None


def _grids(client, run) -> list[tuple[str, bytes]]:
    found = []
    with tempfile.TemporaryDirectory() as folder:
        for item in _png_artifacts(client, run.info.run_id, GRIDS_DIR):
            local = client.download_artifacts(run.info.run_id, item, folder)
            found.append((f"{run.info.run_name}: {item}", Path(local).read_bytes()))
    return found


def _distinct(grids: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    seen: set[bytes] = set()
    kept = []
    for caption, png in grids:
        digest = hashlib.sha256(png).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append((caption, png))
    return kept


def _png_artifacts(client, run_id: str, folder: str) -> list[str]:
    paths = []
    for item in client.list_artifacts(run_id, folder):
        if item.is_dir:
            paths += _png_artifacts(client, run_id, item.path)
        elif item.path.lower().endswith(".png"):
            paths.append(item.path)
    return sorted(paths)


# --------------------------------------------------------------------------- the page
def render(data: RunData) -> str:
    run = data.run
    title = f"{run.info.run_name} ({run.info.run_id})"
    sections = [
        _section("Per-task scores (last stage)", _task_table(data)),
        _section("Task x stage PSNR matrix", _matrix(data)),
        _section("Training loss", _losses(data)),
        _section("Sample grids", _grids_html(data)),
        _section("All metrics of the run", _metrics_table(run.data.metrics)),
        _section("Config", _config_html(data.config)),
    ]
    return _PAGE.format(
        title=html.escape(title),
        status=html.escape(f"{run.info.status}, experiment {run.info.experiment_id}"),
        body="\n".join(sections),
    )


def _section(heading: str, body: str) -> str:
    return f"<section><h2>{html.escape(heading)}</h2>\n{body}\n</section>"


def _table(table_id: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def _task_table(data: RunData) -> str:
    if not data.stages:
        return "<p>No stage runs.</p>"
    metrics = data.stages[-1].data.metrics
    rows = [
        [task, *(_number(metrics.get(f"test/{task}/{key}")) for key, _ in SCORE_COLUMNS)]
        for task in data.tasks
    ]
    return _table("per-task", ["task", *(label for _, label in SCORE_COLUMNS)], rows)


def _matrix(data: RunData) -> str:
    results = {
        s.info.run_name: {
            t: s.data.metrics[f"test/{t}/psnr"]
            for t in data.tasks
            if f"test/{t}/psnr" in s.data.metrics
        }
        for s in data.stages
    }
    if not any(results.values()):
        return "<p>No stage was scored.</p>"
    matrix = StageMatrix.from_stage_results(results, data.tasks)
    rows = [
        [stage, *map(_number, row)] for stage, row in zip(matrix.stages, matrix.values, strict=True)
    ]
    table = _table("stage-matrix", ["stage", *matrix.tasks], rows)
    with tempfile.TemporaryDirectory() as folder:
        png = heatmap_png(matrix, Path(folder) / "matrix.png", title="PSNR (dB): task x stage")
        picture = _img(png.read_bytes(), "task x stage PSNR heatmap")
    continual = {k: v for k, v in data.run.data.metrics.items() if k.startswith("continual/")}
    numbers = _metrics_table(continual, "continual") if continual else ""
    return f"{table}\n{numbers}\n{picture}"


def _losses(data: RunData) -> str:
    if not any(data.losses.values()):
        return "<p>No train/loss history.</p>"
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    offset = 0  # stages follow each other: one step axis for the whole curriculum
    for stage, points in data.losses.items():
        if points:
            steps, values = zip(*sorted(points), strict=True)
            ax.plot([offset + s for s in steps], values, label=stage)
            offset += max(steps)
    ax.set_xlabel("step (curriculum)")
    ax.set_ylabel("train/loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "loss.png"
        fig.savefig(path)
        return _img(path.read_bytes(), "training loss of every stage")


def _grids_html(data: RunData) -> str:
    if not data.grids:
        return "<p>No grids were logged.</p>"
    return "\n".join(
        f"<figure>{_img(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, png in data.grids
    )


def _metrics_table(metrics: dict[str, float], table_id: str = "metrics") -> str:
    rows = [[name, _number(value)] for name, value in sorted(metrics.items())]
    return _table(table_id, ["metric", "value"], rows)


def _config_html(config: dict[str, Any] | None) -> str:
    import yaml

    if config is None:
        return "<p>No config/pipeline.json in this run.</p>"
    text = yaml.safe_dump(config, sort_keys=False)
    return f'<pre id="config">{html.escape(text)}</pre>'


def _img(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _number(value: float | None) -> str:
    if value is None or value != value:  # missing or NaN
        return "-"
    return f"{value:.4g}"  # 4 significant digits: 28.12 dB, SSIM 0.8123


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>allinone report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
thead {{ background: #f0f0f0; }}
img {{ max-width: 100%; }}
figure {{ margin: 1em 0; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{status}</p>
{body}
</body>
</html>
"""
