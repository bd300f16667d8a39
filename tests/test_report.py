"""``allinone report``: a self-contained HTML page of a run, checked in a real headless browser.

The run is recorded as ``allinone run`` leaves one (``record_run``), then given what the end of a
run adds: the suites scored on the real test sets with the classical baselines (the same code, on
CBSD68 and SOTS), the run's facts, a registered model, and an ``allinone eval`` of it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from allinone.cli import stores
from allinone.evaluate.headline import headline, headline_table
from allinone.evaluate.suites import EvalPlan, Results, TaskEntry, log_results, run_suites
from allinone.tracking.registry import register_run
from allinone.tracking.report import THUMB_WIDTH, _number, record_facts
from conftest import TEST_SETS
from test_resolve import RecordedRun, record_run

CHROMIUM = shutil.which("chromium")
WINDOW = (1280, 900)  # a laptop's browser window


def _cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "allinone", *map(str, args)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[RecordedRun, Results]:
    run = record_run(tmp_path_factory.mktemp("report"), "report", tasks=("denoise", "dehaze"))
    pipeline = run.pipeline
    plan = EvalPlan(
        model=pipeline.config.model_spec.load(run.weights),
        trained=tuple(pipeline.config.tasks),
        catalog={n: TaskEntry(t, pipeline.task_path(n)) for n, t in pipeline.tasks.items()},
        data=TEST_SETS,
        max_images=1,
        baselines=True,
    )
    results = run_suites(plan, ["all-in-one"])
    mlflow.set_tracking_uri(run.uri)
    log_results(results, run_id=run.parent_id)  # as the end of a run logs them
    record_facts(run.parent_id, run.uri, parameters=1_234_567)
    register_run(run.parent_id, run.uri)
    evaluated = _cli("eval", "--model", run.parent_id, "--tracking-uri", run.uri,
                     "--max-images", "1", "--tasks", "dehaze")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    return run, results


@pytest.fixture(scope="module")
def page(recorded, tmp_path_factory) -> Path:
    run, _ = recorded
    out = tmp_path_factory.mktemp("page") / "report.html"
    done = _cli("report", run.parent_id, "--out", out, "--tracking-uri", run.uri)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _browser(*args: str) -> subprocess.CompletedProcess:
    # Not skipped when missing: the page must be seen rendering (`make test` installs chromium).
    assert CHROMIUM, "chromium is not installed: apt-get install -y chromium"
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


class Rendered(HTMLParser):
    """Tables (by id, as rows of cell texts), images (source, alt) and links of a rendered DOM."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[tuple[str, str]] = []
        self.links: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(dom)

    def handle_starttag(self, tag, attrs) -> None:
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append((attrs.get("src", ""), attrs.get("alt", "")))
        elif tag == "a":
            self.links.append(attrs.get("href", ""))

    def handle_data(self, data) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None


@pytest.fixture(scope="module")
def dom(page) -> Rendered:
    done = _browser("--dump-dom", page.as_uri())
    assert done.returncode == 0, done.stderr[-3000:]
    return Rendered(done.stdout)


# --------------------------------------------------------------------------- the tests
def test_the_headline_table_is_on_screen_when_the_page_opens(recorded, page, tmp_path) -> None:
    """The real test sets beside the baselines, with margins, in the first screenful: measured by
    the browser's own layout (a probe script reports where the table is)."""
    _, results = recorded
    probe = tmp_path / "probe.html"
    script = (
        "<script>const r = document.getElementById('headline').getBoundingClientRect();"
        "document.body.setAttribute('data-probe', JSON.stringify("
        "{top: r.top, bottom: r.bottom, height: window.innerHeight}));</script>"
    )
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    done = _browser(f"--window-size={WINDOW[0]},{WINDOW[1]}", "--dump-dom", probe.as_uri())
    assert done.returncode == 0, done.stderr[-3000:]
    where = json.loads(
        re.search(r"data-probe=\"([^\"]+)\"", done.stdout).group(1).replace("&quot;", '"')
    )
    assert where["top"] >= 0 and where["bottom"] <= where["height"], where

    header, body = headline_table(headline(results.rows))
    shown = Rendered(done.stdout).tables["headline"]
    assert shown[0] == header and header[-1] == "margin" and "NLM" in header and "DCP" in header
    assert shown[1:] == body
    assert [row[0] for row in shown[1:]] == [
        "CBSD68-sigma15", "CBSD68-sigma25", "CBSD68-sigma50", "SOTS-outdoor",
    ]  # fmt: skip
    assert all(re.fullmatch(r"[+-]\d+\.\d\d vs (TV|NLM|DCP|input)", row[-1]) for row in shown[1:])


def test_the_page_states_the_runs_facts(recorded, dom) -> None:
    run, _ = recorded
    facts = dict(row for row in dom.tables["facts"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", facts["date"])
    assert re.fullmatch(r"(\d+ min )?\d+ s", facts["wall time"])
    assert facts["parameters"] == "1,234,567"
    assert re.fullmatch(r"[0-9a-f]{40}( \+ changes)?", facts["git commit"]), facts["git commit"]
    assert "CPUs" in facts["machine"]
    assert facts["pipeline"] == "report: denoise, dehaze"
    info = MlflowClient(run.uri).get_run(run.parent_id).info
    assert f"#/experiments/{info.experiment_id}/runs/{run.parent_id}" in " ".join(dom.links)


def test_the_final_models_pictures_come_first_as_small_jpegs(recorded, dom) -> None:
    grids = [(src, alt) for src, alt in dom.images if src.startswith("data:image/jpeg")]
    captions = [alt for _, alt in grids]
    assert captions[:2] == ["report: dehaze", "report: denoise"]  # the final model's
    # Each stage shows the tasks it had been trained on: stage 1 no dehaze.
    assert "stage1-denoise: denoise" in captions and "stage1-denoise: dehaze" not in captions
    for src, _ in grids:
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert picture.format == "JPEG" and picture.width <= THUMB_WIDTH


def test_the_scores_matrix_and_curves_are_there(recorded, dom) -> None:
    run, _ = recorded
    last = MlflowClient(run.uri).get_run(run.stage_ids["stage2-dehaze"]).data.metrics
    per_task = dom.tables["per-task"]
    assert per_task[0] == ["task", "PSNR", "SSIM", "PSNR-Y", "SSIM-Y", "input PSNR", "s / image"]
    for row in per_task[1:]:
        assert row[1] == _number(last[f"test/{row[0]}/psnr"])
    matrix = dom.tables["stage-matrix"]
    for stage, scores in run.summary["matrix"].items():
        row = next(r for r in matrix if r[0] == stage)
        assert row[1:] == [_number(scores["denoise"]), _number(scores["dehaze"])]
    assert any(r[0] == "continual/forgetting" for r in dom.tables["continual"])
    assert any(r[0] == "final/average_psnr" for r in dom.tables["metrics"])
    plots = [alt for src, alt in dom.images if src.startswith("data:image/png")]
    assert plots == ["task x stage PSNR heatmap", "train/loss of every stage"]


def test_the_evaluations_of_its_model_are_linked(recorded, dom) -> None:
    run, _ = recorded
    rows = dom.tables["eval-runs"]
    assert len(rows) == 2 and rows[1][0] == "eval all-in-one" and rows[1][2] == run.parent_id
    assert "all-in-one" in rows[1][3] and "dB" in rows[1][3]
    client = MlflowClient(run.uri)
    evals = client.search_runs([client.get_experiment_by_name("allinone-eval").experiment_id])
    assert any(f"/runs/{evals[0].info.run_id}" in link for link in dom.links)


def test_the_inlined_pictures_are_drawn(page, tmp_path) -> None:
    shot = tmp_path / "shot.png"
    done = _browser(f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-3000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    # Tables and text are black on white; only the decoded pictures bring colour.
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 80
    assert saturated.sum() > 5000


def test_a_page_needs_nothing_from_the_network(page) -> None:
    text = page.read_text()
    assert "<link" not in text and "<script" not in text and 'src="http' not in text


def test_a_model_uri_or_latest_names_the_run(recorded, tmp_path) -> None:
    run, _ = recorded
    by_model = _cli("report", "models:/allinone@champion", "--out", tmp_path / "a.html",
                    "--tracking-uri", run.uri)  # fmt: skip
    assert by_model.returncode == 0, by_model.stderr[-2000:]
    assert f"({run.parent_id})" in (tmp_path / "a.html").read_text()
    # `latest`, and its store, from runs/latest.json where `allinone run` left it.
    workdir = tmp_path / "runs" / "report"
    stores.write_latest(stores.LatestRun(run.parent_id, str(workdir), run.uri, None, "report"))
    latest = _cli("report", "latest", "--out", "b.html", cwd=tmp_path)
    assert latest.returncode == 0, latest.stderr[-2000:]
    assert f"({run.parent_id})" in (tmp_path / "b.html").read_text()


def test_an_unknown_run(recorded, tmp_path) -> None:
    run, _ = recorded
    done = _cli("report", "e" * 32, "--tracking-uri", run.uri, "--out", tmp_path / "r.html")
    assert done.returncode == 2 and f"run {'e' * 32} not found" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "r.html").exists()


def test_latest_without_a_run_here_says_what_to_pass(tmp_path) -> None:
    done = _cli("report", "latest", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "runs/latest.json" in done.stderr and "run id" in done.stderr
