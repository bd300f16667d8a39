"""``allinone report``: a self-contained HTML page of a run, checked in a real headless browser."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from allinone.tracking.report import _number
from test_resolve import RecordedRun, record_run

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> RecordedRun:
    return record_run(tmp_path_factory.mktemp("report"), "report", tasks=("denoise", "dehaze"))


@pytest.fixture(scope="module")
def page(recorded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report.html"
    command = [sys.executable, "-m", "allinone", "report", recorded.parent_id, "--out", str(out)]
    command += ["--tracking-uri", recorded.uri]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _browser(*args: str) -> subprocess.CompletedProcess:
    # Not skipped when missing: the page must be seen rendering (.ci/run installs chromium).
    assert CHROMIUM, "chromium is not installed: apt-get install -y chromium"
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


class Rendered(HTMLParser):
    """Tables (by id, as rows of cell texts) and image sources of a rendered DOM."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
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
            self.images.append(attrs.get("src", ""))

    def handle_data(self, data) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None


def test_the_rendered_page_holds_the_tables_and_pictures(recorded, page) -> None:
    done = _browser("--dump-dom", page.as_uri())
    assert done.returncode == 0, done.stderr[-3000:]
    dom = Rendered(done.stdout)
    client = MlflowClient(recorded.uri)
    last = client.get_run(recorded.stage_ids["stage2-dehaze"]).data.metrics
    per_task = dom.tables["per-task"]
    assert per_task[0] == ["task", "PSNR", "SSIM", "PSNR-Y", "SSIM-Y", "input PSNR"]
    assert [row[0] for row in per_task[1:]] == ["denoise", "dehaze"]
    for row in per_task[1:]:
        assert row[1] == _number(last[f"test/{row[0]}/psnr"])
        assert row[2] == _number(last[f"test/{row[0]}/ssim"])
    matrix = dom.tables["stage-matrix"]
    assert matrix[0] == ["stage", "denoise", "dehaze"]
    for stage, scores in recorded.summary["matrix"].items():
        row = next(r for r in matrix if r[0] == stage)
        assert row[1:] == [_number(scores["denoise"]), _number(scores["dehaze"])]
    assert any(r[0] == "continual/forgetting" for r in dom.tables["continual"])
    assert any(r[0] == "final/average_psnr" for r in dom.tables["metrics"])
    # The heatmap, the loss curves, and a grid per task of each stage run (the parent run's
    # copies of the last stage's grids are shown once).
    assert len(dom.images) == 2 + 2 * 2
    assert all(src.startswith("data:image/png;base64,") for src in dom.images)
    assert "name: report" in done.stdout  # the config, as YAML


def test_the_inlined_pictures_are_drawn(page, tmp_path) -> None:
    shot = tmp_path / "shot.png"
    done = _browser(f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-3000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    # Tables and text are black on white; only the decoded heatmap and curves bring colour.
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 80
    assert saturated.sum() > 5000


def test_a_page_needs_nothing_from_the_network(page) -> None:
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text


def test_an_unknown_run(recorded, tmp_path) -> None:
    command = [sys.executable, "-m", "allinone", "report", "e" * 32, "--tracking-uri", recorded.uri]
    command += ["--out", str(tmp_path / "r.html")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and f"run {'e' * 32} not found" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "r.html").exists()
