"""The quiet console of long verbs (``run``, ``tune``, ``submit``): progress on screen, the rest
in the work folder's log.

By default the screen shows our own lines and one progress bar per curriculum stage (steps, the
training loss named for what it is, samples/s) plus one for the whole run with the training time
left; on a screen that is not a terminal (a Ray job's log, a pipe) the bars become one line per
logged step. Everything else, the third-party warnings and reports of the driver and all that
Ray's workers print (DeepSpeed and CUDA probes, Ray Train's reports and clean-up messages), goes
to ``<workdir>/logs/console.log``. ``--verbose`` shows it all on screen as before.

Ray prints workers' output on the driver through one handler of its stdout dispatcher; in quiet
mode ours takes its place, reads the stage lines rank 0 prints (:class:`StepLine`) and files the
rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from allinone.train.loop import STAGE_LINE, StepLine

LOG_FILE = Path("logs") / "console.log"
RAY_HANDLER = "ray_print_logs"  # the name Ray gives its worker-output printer on the driver
PENDING_LIMIT = 10_000  # lines kept while the work folder does not exist yet


class LogFile:
    """An append-only text log inside a work folder that waits for the folder: a run refused
    before it wrote anything leaves nothing behind, and what came before is kept for later."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.path = workdir / LOG_FILE
        self._pending: list[str] = []
        self._file = None
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:  # after close(), a late line (Ray's shutdown) opens the file again
            if self._file is None and self.workdir.is_dir():
                self.path.parent.mkdir(exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
                self._file.writelines(self._pending)
                self._pending.clear()
            if self._file is not None:
                self._file.write(text)
            elif len(self._pending) < PENDING_LIMIT:
                self._pending.append(text)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# --------------------------------------------------------------------------- progress
@dataclass
class _Seen:
    """The last step line of a stage, for the training rate between two of them."""

    step: int
    at: float


class RunProgress:
    """One bar per stage and one for the whole run, from the step lines of rank 0.

    The time left is the run's remaining steps at the training rate measured so far (between
    step lines of the same stage, so start-up, scoring and data preparation are left out)."""

    def __init__(self, console: Console, stages: list[tuple[str, int]]) -> None:
        self.console = console
        self.offsets, total = {}, 0
        for name, steps in stages:
            self.offsets[name] = total
            total += steps
        self.total = total
        self.live = console.is_terminal
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
            auto_refresh=self.live,
        )
        self.log_path: Path | None = None  # where the rest went, in quiet mode
        self._tasks: dict[str, TaskID] = {}
        self._run: TaskID | None = None
        self._seen: dict[str, _Seen] = {}
        self._trained = (0, 0.0)  # steps, seconds of training observed
        self._lock = threading.Lock()

    def __enter__(self) -> RunProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tasks:
            self.bars.stop()

    def say(self, text: object) -> None:
        """A line of our own, above the bars."""
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def step(self, line: StepLine) -> None:
        with self._lock:
            done = self.offsets.get(line.stage, 0) + line.step
            left = self._time_left(line, done)
            status = f"{line.loss}, {line.rate:.1f} samples/s"
            run = f"run {done}/{self.total} steps" + (f", {left}" if left else "")
            if not self.live:
                self.say(f"{line.stage} {line.step}/{line.steps}: {status}; {run}")
                return
            if not self._tasks:  # the bars start with the first step, under what came before
                self.bars.start()
            if line.stage not in self._tasks:
                self._add_stage(line)
            self.bars.update(self._tasks[line.stage], completed=line.step, status=status)
            self.bars.update(self._run, completed=done, status=left)

    def _add_stage(self, line: StepLine) -> None:
        if self._run is not None:  # the whole run's bar stays the last row
            self.bars.remove_task(self._run)
        self._tasks[line.stage] = self.bars.add_task(line.stage, total=line.steps, status="")
        self._run = self.bars.add_task("whole run", total=self.total, status="")

    def _time_left(self, line: StepLine, done: int) -> str:
        now = time.monotonic()
        seen = self._seen.get(line.stage)
        if seen is not None and line.step > seen.step:
            steps, seconds = self._trained
            self._trained = (steps + line.step - seen.step, seconds + now - seen.at)
        self._seen[line.stage] = _Seen(line.step, now)
        steps, seconds = self._trained
        if not steps or done >= self.total:
            return ""
        return f"~{_duration((self.total - done) * seconds / steps)} of training left"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


# --------------------------------------------------------------------------- worker output
class WorkerOutput:
    """Ray's worker-output handler in quiet mode: stage lines to the progress (or, without one,
    as for a study's trials side by side, to the log too), the rest to the log file. Called on
    Ray's log thread with a batch of one process's lines."""

    def __init__(self, progress: RunProgress | None, log: LogFile) -> None:
        self.progress, self.log = progress, log

    def __call__(self, batch: dict[str, Any]) -> None:
        if batch.get("pid") == "autoscaler":  # its status report every 5 s (Ray shows events only)
            return
        origin = batch.get("actor_name") or batch.get("task_name") or "worker"
        for line in batch.get("lines", ()):
            step = StepLine.parse(line) if self.progress else None
            if step is not None:
                self.progress.step(step)
            elif self.progress and STAGE_LINE.match(line):  # a validation line
                self.progress.say(line)
            else:
                self.log.write(f"({origin} pid={batch.get('pid')}) {line}\n")


@contextmanager
def _worker_output_routed(handler: WorkerOutput) -> Iterator[None]:
    """Ray's own printer of worker output replaced by ``handler``, whether Ray starts later in
    this process (the usual case: the run starts it) or has already started."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    add = dispatcher.add_handler

    def add_handler(name: str, printer: Callable) -> None:
        add(name, handler if name == RAY_HANDLER else printer)

    if any(name == RAY_HANDLER for name, _ in dispatcher.handlers):
        dispatcher.remove_handler(RAY_HANDLER)
        add(RAY_HANDLER, handler)
    dispatcher.add_handler = add_handler  # an attribute of the instance shadows the method
    try:
        yield
    finally:
        del dispatcher.add_handler


@contextmanager
def _third_party_to(log: LogFile) -> Iterator[None]:
    """Every library's log records and Python's warnings into ``log``, and MLflow's own printed
    notices ("Successfully registered model ...") too.

    Ray, Ray Data and MLflow set up their console handlers when imported, so they are imported
    first; each logger's console handlers are then replaced by the log's, and the root logger
    gets it too (a record reaching a root without handlers would go to stderr)."""
    import mlflow.utils.logging_utils as mlflow_logging
    import ray.data  # noqa: F401  (its import sets up its loggers' handlers)

    ours = logging.StreamHandler(log)
    ours.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.root] + [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and not name.startswith("allinone")
    ]
    saved = {logger: list(logger.handlers) for logger in loggers}
    for logger in loggers:
        kept = [h for h in logger.handlers if not _on_console(h)]
        if logger is logging.root or len(kept) < len(logger.handlers):
            logger.handlers = [*kept, ours]
    logging.captureWarnings(True)
    # MLflow prints its notices to this stream (which writes to sys.stderr); switching it off
    # does not last, MLflow switches it on again after logging a model.
    notices = mlflow_logging.MLFLOW_LOGGING_STREAM
    notices.write, notices.flush = log.write, log.flush
    try:
        yield
    finally:
        del notices.write, notices.flush
        logging.captureWarnings(False)
        for logger, handlers in saved.items():
            logger.handlers = handlers


def _on_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


@contextmanager
def run_console(
    console: Console, log_folder: Path, verbose: bool, stages: list[tuple[str, int]] | None = None
) -> Iterator[RunProgress]:
    """The console of a run that works in ``log_folder``: bars for ``stages`` (or none: a
    study's trials run side by side) and, unless ``verbose``, everything else filed in the
    folder's log. Yields what prints our own lines (``.say``) above the bars; after a failure
    the last line before the error names the log."""
    progress = RunProgress(console, stages or [])
    if verbose:
        with progress:
            yield progress
        return
    log = LogFile(log_folder)
    try:
        with _third_party_to(log), _worker_output_routed(WorkerOutput(progress, log)), progress:
            yield progress
    except BaseException:
        if log.path.is_file():
            console.print(f"full log: {shown_path(log.path)}", highlight=False, soft_wrap=True)
        raise
    finally:
        log.close()
        progress.log_path = log.path if log.path.is_file() else None


def shown_path(path: Path) -> str:
    """A path relative to where the command runs when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
