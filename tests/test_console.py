"""The quiet console: progress named for what it shows, Ray's worker output routed, tables that fit.

The whole console of a real ``make run`` (no traceback, nothing but our lines, the closing block
whose commands work) is checked by tests/test_readme.py, which runs it beside a second Ray
instance (``ray_session``), where Ray's placement-group cleaner used to print a traceback.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from allinone.cli.closing import (
    Closing,
    headline_rich,
    print_closing,
    results_tables,
    timing_line,
)
from allinone.cli.console import LOG_FILE, LogFile, RunProgress, run_console
from allinone.curriculum.run import RunTiming
from allinone.evaluate.headline import Headline, headline, headline_table
from allinone.evaluate.suites import Results, Row
from allinone.train.loop import StepLine, named_loss

STAGES = [("stage1-denoise", 400), ("stage2-derain", 300), ("stage3-dehaze", 600)]


def _row(set_name: str, method: str, psnr: float, task: str = "denoise", **extra) -> Row:
    return Row("all-in-one", task, set_name, method, 12, psnr, 0.8, psnr + 1, 0.81, 20.0, **extra)


def _results() -> Results:
    rows = []
    for sigma, model, tv, nlm in ((15, 29.41, 27.91, 29.82), (25, 27.37, 26.97, 27.20)):
        name = f"CBSD68-sigma{sigma}"
        rows += [_row(name, "model", model), _row(name, "tv", tv), _row(name, "nlm", nlm)]
        rows.append(_row(name, "input", 20.0))
    rows.append(_row("Rain100L", "model", 28.62, task="derain"))
    rows.append(_row("synthetic-length15-angle45", "model", 22.0, task="derain"))
    rows.append(_row("synthetic", "model", 21.0, task="motion_blur"))
    return Results(rows=rows)


def _screen(width: int = 80, terminal: bool = False) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, force_terminal=terminal, color_system=None), out


# --------------------------------------------------------------------------- the loss, named
def test_the_psnr_loss_is_shown_as_the_psnr_it_is_and_parsed_back() -> None:
    parts = {"pixel": -24.31, "total": -24.31}  # psnr_loss: minus the batch's PSNR
    line = StepLine("stage1-denoise", 50, 400, named_loss(parts, "psnr"), 4.9e-4, 55.12)
    assert str(line) == (
        "[stage1-denoise] step 50/400 train PSNR 24.31 dB, lr 4.9e-04, 55.1 samples/s"
    )
    assert StepLine.parse(str(line)) == StepLine(
        "stage1-denoise", 50, 400, "train PSNR 24.31 dB", 4.9e-4, 55.1
    )
    assert StepLine.parse("[stage1-denoise] step 50/400 denoise/average_psnr 24.1 dB") is None
    with_aux = named_loss({"pixel": 0.03, "orthogonality": 0.2, "total": 0.032}, "l1")
    assert with_aux == "l1 0.0300 (total loss 0.0320)"
    assert named_loss({"noise": 0.5, "total": 0.5}, "psnr") == "loss 0.5000"  # no pixel loss


# --------------------------------------------------------------------------- progress
def test_a_terminal_gets_a_bar_per_stage_and_one_for_the_whole_run() -> None:
    screen, out = _screen(width=100, terminal=True)
    with RunProgress(screen, STAGES) as progress:
        progress.say("shards denoise/train: 104 samples")
        for step in (50, 100):
            progress.step(StepLine("stage1-denoise", step, 400, "train PSNR 24.31 dB", 5e-4, 55))
            time.sleep(0.05)
        progress.step(StepLine("stage2-derain", 50, 300, "train PSNR 26.02 dB", 5e-4, 54))
    shown = out.getvalue()
    assert "shards denoise/train: 104 samples" in shown
    last = shown[shown.rindex("stage1-denoise") :]  # the bars' final frame
    assert "100/400" in last and "50/300" in last and "train PSNR 26.02 dB" in last
    assert "whole run" in last and "450/1300" in last and "of training left" in last
    assert last.index("stage2-derain") < last.index("whole run")  # the run's bar stays last


def test_a_log_gets_a_line_per_step_with_the_run_and_its_time_left() -> None:
    screen, out = _screen(terminal=False)
    with RunProgress(screen, STAGES) as progress:
        progress.step(StepLine("stage1-denoise", 50, 400, "train PSNR 24.31 dB", 5e-4, 55))
        time.sleep(0.05)
        progress.step(StepLine("stage1-denoise", 100, 400, "train PSNR 25.02 dB", 5e-4, 55))
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "stage1-denoise 50/400: train PSNR 24.31 dB, 55.0 samples/s; run 50/1300 steps"
    )
    assert lines[1].startswith("stage1-denoise 100/400: train PSNR 25.02 dB, 55.0 samples/s; ")
    assert lines[1].endswith("of training left") and "\x1b" not in out.getvalue()


# --------------------------------------------------------------------------- quiet
def test_third_party_warnings_and_logs_go_to_the_work_folders_log(tmp_path: Path, capfd) -> None:
    import mlflow.utils.logging_utils as mlflow_logging
    import ray.data  # noqa: F401  (its loggers exist, with their handlers, before the console)

    workdir = tmp_path / "work"
    screen, out = _screen()
    before = {name: list(logging.getLogger(name).handlers) for name in ("ray", "mlflow", "")}
    with run_console(screen, workdir, verbose=False, stages=STAGES) as progress:
        logging.getLogger("ray.data").warning("a Ray Data warning")
        logging.getLogger("deepspeed").warning("a DeepSpeed warning")
        mlflow_logging.enable_logging()  # as MLflow does itself after logging a model
        mlflow_logging.eprint("Successfully registered model 'allinone'.")
        workdir.mkdir()  # the run makes its folder: the log starts then, with what came before
        warnings.warn("a library's FutureWarning", FutureWarning, stacklevel=1)
        progress.say("our own line")
    assert out.getvalue() == "our own line\n"
    assert capfd.readouterr() == ("", "")  # nothing reached the process's own stdout/stderr
    log = (workdir / LOG_FILE).read_text()
    for text in ("a Ray Data warning", "a DeepSpeed warning", "a library's FutureWarning",
                 "Successfully registered model"):  # fmt: skip
        assert text in log
    assert progress.log_path == workdir / LOG_FILE
    after = {name: list(logging.getLogger(name).handlers) for name in ("ray", "mlflow", "")}
    assert after == before  # every logger as it was


def test_a_run_refused_before_its_folder_exists_writes_no_log(tmp_path: Path) -> None:
    screen, out = _screen()
    with pytest.raises(ValueError), run_console(screen, tmp_path / "never", verbose=False):
        logging.getLogger("mlflow").warning("before the folder")
        raise ValueError("refused")
    assert not (tmp_path / "never").exists() and out.getvalue() == ""


def test_a_log_opens_again_for_a_line_after_it_was_closed(tmp_path: Path) -> None:
    log = LogFile(tmp_path)
    log.write("first\n")
    log.close()
    log.write("late\n")
    log.close()
    assert (tmp_path / LOG_FILE).read_text() == "first\nlate\n"


def test_workers_output_reaches_the_bars_or_the_log_through_ray(tmp_path: Path, ray_session):
    """A real Ray task prints a stage line and library noise; the driver's quiet console puts the
    first into the progress and files the rest."""
    ray = ray_session

    @ray.remote
    def worker() -> None:
        print("[stage1-denoise] step 3/6 train PSNR 21.00 dB, lr 5.0e-04, 2.0 samples/s")
        print("[stage1-denoise] step 3/6 denoise/average_psnr 20.10 dB")
        print("[WARNING] Setting accelerator to CPU.", flush=True)

    tmp_path.joinpath("work").mkdir()
    screen, out = _screen(terminal=False)
    with run_console(screen, tmp_path / "work", verbose=False, stages=STAGES):
        ray.get(worker.remote())
        deadline = time.monotonic() + 60
        while "average_psnr" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.5)  # Ray's log thread delivers the lines a moment later
        time.sleep(1.0)
    shown = out.getvalue()
    assert "stage1-denoise 3/6: train PSNR 21.00 dB, 2.0 samples/s; run 3/1300 steps" in shown
    assert "[stage1-denoise] step 3/6 denoise/average_psnr 20.10 dB" in shown
    assert "accelerator" not in shown
    assert "Setting accelerator to CPU." in (tmp_path / "work" / LOG_FILE).read_text()


# --------------------------------------------------------------------------- tables
def test_the_headline_measures_the_model_against_the_strongest_method() -> None:
    lines = headline(_results().rows)
    assert [line.set for line in lines] == ["CBSD68-sigma15", "CBSD68-sigma25", "Rain100L"]
    header, body = headline_table(lines)
    assert header == ["set", "images", "input", "model", "TV", "NLM", "margin"]
    assert body[0][-1] == "-0.41 vs NLM" and body[1][-1] == "+0.17 vs NLM"
    assert body[2][4:] == ["-", "-", "+8.62 vs input"]  # no classical method for rain
    hazy = Headline("dehaze", "SOTS-outdoor", 2, 18.25, 17.89, 0.8, {"dark_channel": 15.29})
    assert hazy.rival == ("input", 18.25)  # a method that harms its input is no bar


def test_eval_tables_fit_80_columns_with_whole_set_names() -> None:
    screen, out = _screen(width=80)
    for table in results_tables(_results()):
        screen.print(table)
    shown = out.getvalue()
    assert max(len(line) for line in shown.splitlines()) <= 80
    for name in ("CBSD68-sigma15", "CBSD68-sigma25", "synthetic-length15-angle45", "motion_blur"):
        assert name in shown
    assert "…" not in shown


def test_the_closing_block_names_the_run_and_gives_ready_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "data"
    closing = Closing(
        title="quickstart: finished",
        run_id="a" * 32,
        workdir=tmp_path / "runs" / "quickstart",
        tracking_uri="sqlite:////elsewhere/mlflow.db",
        model="models:/allinone/1",
        model_note="@champion (first model)",
        headline=headline(_results().rows),
        data=data,
        photos=data / "Rain100L" / "rain",
        log=tmp_path / "runs" / "quickstart" / LOG_FILE,
        time=timing_line(RunTiming(456.0, {"stage1-denoise": 14.2, "stage2-derain": 11.6})),
    )
    screen, out = _screen(width=80)
    print_closing(screen, closing)
    shown = out.getvalue()
    for text in ("run id", "a" * 32, "runs/quickstart", "models:/allinone/1 @champion"):
        assert text in shown
    assert "CBSD68-sigma25" in shown and "+0.17 vs NLM" in shown
    timing = "time          7.6 min (stage start-ups: 14 + 12 s, fit() to first step)"
    assert timing in shown
    store = "--tracking-uri sqlite:////elsewhere/mlflow.db"  # not found from here: given
    assert f"allinone eval --model models:/allinone/1 --data data --baselines {store}" in shown
    assert f"restore --model models:/allinone/1 data/Rain100L/rain --out restored/ {store}" in shown
    assert f"allinone report {'a' * 32} --out report.html {store}" in shown
    assert "mlflow ui --backend-store-uri sqlite:////elsewhere/mlflow.db" in shown
    assert headline_rich(closing.headline).columns[0].no_wrap  # a set's name is never cut


# --------------------------------------------------------------------------- which store
def test_verbs_find_the_last_runs_store_or_say_which_flag_to_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from allinone.cli import stores

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(stores.StoreError, match="no tracking store found here .* --tracking-uri"):
        stores.tracking_uri_for(None, "models:/allinone@champion")
    (tmp_path / "model.pt").touch()
    assert stores.tracking_uri_for(None, "model.pt") is None  # a checkpoint needs no store
    for name in ("quickstart", "smoke"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "mlflow.db").touch()
    with pytest.raises(stores.StoreError, match=r"2 tracking stores under runs/ .*the newest"):
        stores.tracking_uri(None)
    (tmp_path / "runs" / "smoke" / "mlflow.db").unlink()
    only = f"sqlite:///{tmp_path / 'runs' / 'quickstart' / 'mlflow.db'}"
    assert stores.tracking_uri(None) == only  # the one store there is
    latest = stores.LatestRun("f" * 32, str(tmp_path / "runs" / "x"), "sqlite:///x.db", None, "x")
    stores.write_latest(latest)
    assert stores.tracking_uri(None) == "sqlite:///x.db"  # the last run's, before any other
    assert stores.run_ref("latest") == "f" * 32 and stores.model_ref("latest") == "f" * 32
    assert stores.model_ref("models:/a@b") == "models:/a@b"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert stores.tracking_uri(None) == "http://server:5000"
    assert stores.tracking_uri("sqlite:///given.db") == "sqlite:///given.db"
