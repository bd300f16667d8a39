"""``allinone report RUN``: one self-contained HTML page of a curriculum run.

Everything comes from MLflow, so a run on a cluster reports the same as a local one. The page
reads top down as a researcher asks: what the run was (date, wall time, parameters, commit,
machine), how the final model does on the real test sets beside the input and the classical
baselines (the headline table), what its restorations look like, then the task x stage matrix on
the synthetic test splits, the training curves, each stage's pictures of the tasks it had been
trained on, the evaluations of this model (linked to MLflow's UI) and the config. Pictures are
inlined, grids as compressed JPEG thumbnails: the page is one file that opens anywhere, with
nothing to fetch, and stays a few MB.

``RUN`` is a run id, a model URI (``models:/allinone@champion``: the run that logged it) or, at
the command line, ``latest``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import io
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allinone.base.files import write_atomic
from allinone.base.provenance import git_commit
from allinone.evaluate.continual import StageMatrix, heatmap_png
from allinone.evaluate.grids import GRIDS_DIR
from allinone.evaluate.headline import headline, headline_table
from allinone.evaluate.suites import Row

SCORE_COLUMNS = (("psnr", "PSNR"), ("ssim", "SSIM"), ("psnr_y", "PSNR-Y"), ("ssim_y", "SSIM-Y"))
SCORE_COLUMNS += (("input_psnr", "input PSNR"), ("seconds", "s / image"))
RESULTS_ARTIFACT = "eval/results.json"  # the run-end suites' rows (evaluate.suites.log_results)
EVAL_EXPERIMENT = "allinone-eval"  # where `allinone eval` logs its runs
SOURCE_TAG = "allinone.source_run"  # on an eval run: the run whose model it evaluated
FACT_TAGS = {
    "allinone.parameters": "parameters",
    "allinone.git_commit": "git commit",
    "allinone.machine": "machine",
}
UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
THUMB_WIDTH = 960  # px: a grid's three panels stay readable
JPEG_QUALITY = 80


class ReportError(ValueError):
    """A run that cannot be reported; the message names it."""


@dataclass(frozen=True)
class RunData:
    """What the page shows, read from MLflow."""

    run: Any  # mlflow.entities.Run, the curriculum's parent run
    stages: list[Any]  # its stage runs, in stage order
    config: dict[str, Any] | None
    curves: dict[str, list[tuple[int, float]]]  # stage name -> (step, value) of the train curve
    curve_label: str  # what the curve is: "train PSNR (dB)" or "train/loss"
    final_grids: list[tuple[str, bytes]]  # (caption, PNG) of the final model
    stage_grids: list[tuple[str, bytes]]  # each stage's grids of the tasks it had trained
    results: list[Row] = field(default_factory=list)  # the run-end suites' rows
    evaluations: list[Any] = field(default_factory=list)  # `allinone eval` runs of its model
    ui: str = UI

    @property
    def tasks(self) -> list[str]:
        if self.config:
            return list(self.config["tasks"])
        names = {k.split("/")[1] for s in self.stages for k in s.data.metrics if _is_score(k)}
        return sorted(names)


def _is_score(metric: str) -> bool:
    return metric.startswith("test/") and metric.endswith("/psnr") and metric.count("/") == 2


def write_report(ref: str, out: Path, tracking_uri: str | None = None) -> Path:
    page = render(read_run(ref, tracking_uri))
    return write_atomic(out, page)


# --------------------------------------------------------------------------- run facts
def record_facts(run_id: str, tracking_uri: str, parameters: int) -> None:
    """Tag a finished run with what its report states beside MLflow's own dates: the model's
    parameter count, the code's git commit and the machine it ran on."""
    from mlflow import MlflowClient

    facts = {"allinone.parameters": str(parameters), "allinone.machine": machine()}
    commit = git_commit()
    if commit:
        facts["allinone.git_commit"] = commit
    client = MlflowClient(tracking_uri)
    for key, value in facts.items():
        client.set_tag(run_id, key, value)


def machine() -> str:
    """The driver's host, CPUs and GPUs, and the Ray cluster's size when one is attached."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    text = f"{platform.node()} ({platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    text += f", {len(gpus)} x {gpus[0]})" if gpus else ", no GPU)"
    try:
        import ray

        if ray.is_initialized():
            nodes = len([n for n in ray.nodes() if n.get("Alive")])
            total = ray.cluster_resources()
            text += f"; Ray: {nodes} node(s), {total.get('CPU', 0):g} CPUs, "
            text += f"{total.get('GPU', 0):g} GPUs"
    except ImportError:
        pass
    return text


# --------------------------------------------------------------------------- reading MLflow
def read_run(ref: str, tracking_uri: str | None = None) -> RunData:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per grid
    client = MlflowClient()
    run_id = _run_of(ref)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ReportError(f"run {run_id} not found in {mlflow.get_tracking_uri()}") from None
    stages = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    stages.sort(key=lambda s: (int(s.data.params.get("stage.index", 0)), s.info.start_time))
    config = _load_json(f"runs:/{run_id}/config/pipeline.json")
    curve_label, curves = _curves(client, stages, config)
    final = _grids(client, run)
    trained = [g for s in stages for g in _grids(client, s, _stage_tasks(s))]
    return RunData(
        run,
        stages,
        config,
        curves,
        curve_label,
        final,
        _distinct(trained, seen=final),
        read_results(run_id, mlflow.get_tracking_uri()),
        _evaluations(client, run_id),
        _ui(mlflow.get_tracking_uri()),
    )


def read_results(run_id: str, tracking_uri: str) -> list[Row]:
    """The rows a run's end-of-run suites logged (none when it ran no suite)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    results = _load_json(f"runs:/{run_id}/{RESULTS_ARTIFACT}") or {}
    return [Row(**row) for row in results.get("rows", [])]


def _run_of(ref: str) -> str:
    """The run id a reference names: itself, or the run that logged a model URI."""
    if not ref.startswith(("models:/", "runs:/")):
        return ref
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        info = mlflow.models.get_model_info(ref)
    except (MlflowException, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReportError(f"model {ref} does not resolve: {first}") from None
    if not info.run_id:
        raise ReportError(f"model {ref} was not logged by a run (an imported model?)")
    return info.run_id


def _load_json(uri: str) -> Any:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_dict(uri)
    except (MlflowException, OSError):
        return None


def _curves(client, stages, config) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """Each stage's training curve; with the psnr pixel loss (minus the PSNR) shown as the PSNR
    it is."""
    psnr = (config or {}).get("train", {}).get("pixel_loss") == "psnr"
    metric, sign, label = ("train/pixel", -1, "train PSNR (dB)") if psnr else ("train/loss", 1, "")
    curves = {
        s.info.run_name: [
            (m.step, sign * m.value) for m in client.get_metric_history(s.info.run_id, metric)
        ]
        for s in stages
    }
    return label or metric, curves


def _stage_tasks(stage) -> set[str] | None:
    tasks = stage.data.params.get("stage.tasks")
    return set(tasks.split(",")) if tasks else None


def _grids(client, run, tasks: set[str] | None = None) -> list[tuple[str, bytes]]:
    found = []
    with tempfile.TemporaryDirectory() as folder:
        for item in _png_artifacts(client, run.info.run_id, GRIDS_DIR):
            if tasks is not None and Path(item).stem not in tasks:
                continue  # a task this stage had not been trained on yet
            local = client.download_artifacts(run.info.run_id, item, folder)
            found.append((f"{run.info.run_name}: {Path(item).stem}", Path(local).read_bytes()))
    return found


def _distinct(grids, seen=()) -> list[tuple[str, bytes]]:
    known = {hashlib.sha256(png).digest() for _, png in seen}
    kept = []
    for caption, png in grids:
        digest = hashlib.sha256(png).digest()
        if digest not in known:
            known.add(digest)
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


def _evaluations(client, run_id: str) -> list[Any]:
    experiment = client.get_experiment_by_name(EVAL_EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{SOURCE_TAG}` = '{run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def _ui(tracking_uri: str) -> str:
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else UI


# --------------------------------------------------------------------------- the page
def render(data: RunData) -> str:
    run = data.run
    title = f"{run.info.run_name} ({run.info.run_id})"
    sections = [
        _section("Real test sets", _headline(data)),
        _section("Run", _facts(data)),
        _section("The final model's restorations", _figures(data.final_grids, "final")),
        _section("Per-task scores on the test splits (last stage)", _task_table(data)),
        _section("Task x stage PSNR matrix (test splits)", _matrix(data)),
        _section("Training", _curve_plot(data)),
        _section("Each stage, on the tasks it had been trained on", _figures(data.stage_grids)),
        _section("Evaluations of this model", _evaluations_html(data)),
        _section("Config", _config_html(data.config)),
        "<details><summary>All metrics of the run</summary>\n"
        + _metrics_table(run.data.metrics)
        + "\n</details>",
    ]
    return _PAGE.format(title=html.escape(title), body="\n".join(sections))


def _section(heading: str, body: str) -> str:
    return f"<section><h2>{html.escape(heading)}</h2>\n{body}\n</section>"


def _table(table_id: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def _facts(data: RunData) -> str:
    info, tags, config = data.run.info, data.run.data.tags, data.config or {}
    rows = [
        ["date", _when(info.start_time)],
        ["wall time", _wall(info.start_time, info.end_time)],
        ["status", info.status],
    ]
    if config:
        model = config.get("model", {})
        steps = sum(config.get("curriculum", {}).get("steps", []))
        rows.append(["pipeline", f"{config.get('name')}: {', '.join(config.get('tasks', []))}"])
        rows.append(["model", f"{model.get('name')} ({model.get('preset')}), {steps:,} steps"])
    for tag, label in FACT_TAGS.items():
        value = tags.get(tag, "-")
        rows.append([label, f"{int(value):,}" if value.isdigit() else value])
    link = f"{data.ui}/#/experiments/{info.experiment_id}/runs/{info.run_id}"
    body = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows
    )
    table = f'<table id="facts"><tbody>\n{body}\n</tbody></table>'
    return f'{table}\n<p><a href="{html.escape(link)}">this run in MLflow</a></p>'


def _when(epoch_ms: int | None) -> str:
    if not epoch_ms:
        return "-"
    return dt.datetime.fromtimestamp(epoch_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _wall(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms or not end_ms:
        return "still running" if start_ms else "-"
    minutes, seconds = divmod(round((end_ms - start_ms) / 1000), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _headline(data: RunData) -> str:
    lines = headline(data.results)
    if not lines:
        return (
            "<p>This run was not scored on real test sets (its pipeline has no "
            "<code>eval.data</code>); the matrix below is on the tasks' synthetic test splits.</p>"
        )
    header, body = headline_table(lines)
    note = "<p>PSNR (dB); the margin is over the strongest method scored on the set, or over "
    note += "its degraded input when no method beats that.</p>"
    return _table("headline", header, body) + "\n" + note


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


def _curve_plot(data: RunData) -> str:
    if not any(data.curves.values()):
        return "<p>No training curve was logged.</p>"
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    offset = 0  # stages follow each other: one step axis for the whole curriculum
    for stage, points in data.curves.items():
        if points:
            steps, values = zip(*sorted(points), strict=True)
            ax.plot([offset + s for s in steps], values, label=stage)
            offset += max(steps)
    ax.set_xlabel("step (curriculum)")
    ax.set_ylabel(data.curve_label)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "curve.png"
        fig.savefig(path)
        return _img(path.read_bytes(), f"{data.curve_label} of every stage")


def _figures(grids: list[tuple[str, bytes]], css_class: str = "") -> str:
    if not grids:
        return "<p>No grids were logged.</p>"
    attribute = f' class="{css_class}"' if css_class else ""
    return "\n".join(
        f"<figure{attribute}>{_img(thumbnail(png), caption, 'image/jpeg')}"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, png in grids
    )


def thumbnail(png: bytes, width: int = THUMB_WIDTH) -> bytes:
    """A grid as a JPEG at most ``width`` wide: a tenth of the PNG's bytes, still readable."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.width > width:
        size = (width, round(image.height * width / image.width))
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


def _evaluations_html(data: RunData) -> str:
    intro = (
        "<p>The run's own end-of-run suites are the tables above. "
        "<code>allinone eval</code> of this model logs a run here.</p>"
    )
    if not data.evaluations:
        return intro
    rows = []
    for run in data.evaluations:
        link = f"{data.ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        averages = {
            k.split("/")[1]: v
            for k, v in run.data.metrics.items()
            if k.startswith("eval/") and k.endswith("/average_psnr")
        }
        rows.append(
            f'<tr><td><a href="{html.escape(link)}">{html.escape(run.info.run_name or "")}</a>'
            f"</td><td>{html.escape(_when(run.info.start_time))}</td>"
            f"<td>{html.escape(run.data.params.get('model', ''))}</td><td>"
            + html.escape(", ".join(f"{k} {v:.2f} dB" for k, v in averages.items()))
            + "</td></tr>"
        )
    head = "<tr><th>run</th><th>date</th><th>model</th><th>average PSNR</th></tr>"
    return (
        f'{intro}<table id="eval-runs"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
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


def _img(data: bytes, alt: str, mime: str = "image/png") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{encoded}">'


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
body {{ font-family: system-ui, sans-serif; margin: 1em auto; max-width: 72em; color: #222; }}
h1 {{ font-size: 1.4em; margin: 0.3em 0; }}
h2 {{ font-size: 1.15em; margin: 1em 0 0.3em; }}
table {{ border-collapse: collapse; margin: 0.3em 0 0.6em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
#facts td, #facts th {{ text-align: left; }}
thead {{ background: #f0f0f0; }}
img {{ max-width: 100%; }}
figure {{ margin: 1em 0; }}
figure img {{ max-height: 32em; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""
