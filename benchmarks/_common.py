"""Shared by the benchmarks: the photo folder, a markdown table, and how busy the machine was.

The machine these run on is often shared: a ratio measured while another job holds a core says
little about our code. ``CpuWindow`` reads ``/proc/stat`` and this process tree's CPU time around
a measurement (its descendants sampled while they live), so a table can show how many cores other
processes were using meanwhile.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil  # a dependency of deepspeed and of the platform's Ray stack

REPO = Path(__file__).resolve().parents[1]
CLEAN_PHOTOS = Path(__file__).resolve().parents[2] / "shared/data/train/CSun_Hays80"


def photos(count: int) -> list[Path]:
    """The first ``count`` clean photos (1024-pixel JPEGs), sorted by name for repeatable runs."""
    found = sorted(CLEAN_PHOTOS.glob("*.jpg"))
    if len(found) < count:
        raise SystemExit(f"{CLEAN_PHOTOS}: {len(found)} photos found, {count} needed")
    return found[:count]


def photo_folder(folder: Path, count: int) -> Path:
    """A folder with exactly ``count`` photos (symlinks), so a task's source sees only those."""
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos(count):
        link = folder / photo.name
        if not link.exists():
            link.symlink_to(photo)
    return folder


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table; columns of numbers (or ratios like 1.9x) right-aligned."""

    def cell(value: object) -> str:
        return f"{value:,.1f}" if isinstance(value, float) else str(value)

    def numeric(value: object) -> bool:
        return isinstance(value, int | float) or str(value)[:1].isdigit()

    align = ["---:" if rows and numeric(rows[0][i]) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class _TreeClock:
    """CPU seconds of this process tree over a window, its descendants sampled while they live.

    A descendant's time would be lost when it exits unreaped by this process: a local Ray
    session's raylet, workers and actors end with the session, and a benchmark that trains in
    ``allinone run`` subprocesses starts whole Ray sessions of its own. So a thread reads every
    descendant's CPU time every ``every`` seconds and keeps the last reading of each; this
    process's reaped children are counted once, through its own ``children_*`` times.
    """

    def __init__(self, every: float = 0.5) -> None:
        self.me = psutil.Process()
        self.every = every
        self.latest: dict[tuple[int, float], tuple[float, bool]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.own_start = self._own()
        self.baseline = {key: seconds for key, (seconds, _) in self._sample().items()}
        self._thread.start()

    def stop(self) -> float:
        """CPU seconds the tree used since ``start``."""
        self._stop.set()
        self._thread.join()
        alive = self._sample()
        used = self._own() - self.own_start
        for key, (seconds, direct) in self.latest.items():
            if direct and key not in alive:  # reaped by us: its whole life is in children_*
                used -= self.baseline.get(key, 0.0)
            else:
                used += seconds - self.baseline.get(key, 0.0)
        return used

    def _own(self) -> float:
        times = self.me.cpu_times()
        return times.user + times.system + times.children_user + times.children_system

    def _sample(self) -> dict[tuple[int, float], tuple[float, bool]]:
        found = {}
        for child in self.me.children(recursive=True):
            try:
                times, created, parent = child.cpu_times(), child.create_time(), child.ppid()
            except psutil.Error:
                continue
            found[(child.pid, created)] = (times.user + times.system, parent == self.me.pid)
        self.latest.update(found)
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self._sample()
            except psutil.Error:  # the tree changed under the walk: the next reading has it
                continue


@dataclass
class CpuWindow:
    """Wall time, this process tree's CPU time and everybody else's CPU use over a ``with`` block.

    ``cpu`` counts this process, the children it reaped and every descendant seen alive while
    the block ran (sampled twice a second: one that lives less than that may be missed). ``busy``
    and ``others`` are in cores (1.0 = one core busy all along).
    """

    wall: float = 0.0
    cpu: float = 0.0
    machine: float = 0.0

    def __enter__(self) -> CpuWindow:
        self._clock = _TreeClock()
        self._clock.start()
        self.started = time.perf_counter()
        self._start = (self.started, _machine_busy_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall, machine = self._start
        self.wall = time.perf_counter() - wall
        self.machine = _machine_busy_seconds() - machine
        self.cpu = self._clock.stop()

    @property
    def busy(self) -> float:
        """Cores busy machine-wide, whoever used them."""
        return self.machine / max(self.wall, 1e-9)

    @property
    def others(self) -> float:
        return max(0.0, self.machine - self.cpu) / max(self.wall, 1e-9)


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {one:.2f} (1 min) {five:.2f} (5 min)"


@contextmanager
def machine_use_reported() -> Iterator[None]:
    """Around a benchmark's whole run: its last line says how many cores other processes used
    meanwhile, so a figure measured on a busy machine says so."""
    with CpuWindow() as window:
        yield
    own = window.cpu / max(window.wall, 1e-9)
    print(
        f"\nmachine: {os.cpu_count()} cores; over the {window.wall:.0f} s of this run other "
        f"processes used {window.others:.2f} cores on average (this run {own:.2f})"
    )
