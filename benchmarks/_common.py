"""Shared by the benchmarks: the photo folder, a markdown table, and how busy the machine was.

The machine these run on is often shared: a ratio measured while another job holds a core says
little about our code. ``CpuWindow`` reads ``/proc/stat`` and this process tree's CPU time around a
measurement, so a table can show how many cores other processes were using meanwhile.
"""

from __future__ import annotations

import os
import shutil
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


def _tree_cpu_seconds() -> dict[int, float]:
    """CPU seconds of this process (with its reaped children) and of each living descendant:
    DataLoader workers, and a local Ray session's raylet, workers and actors."""
    me = psutil.Process()
    times = me.cpu_times()
    seconds = {me.pid: times.user + times.system + times.children_user + times.children_system}
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[child.pid] = times.user + times.system
    return seconds


@dataclass
class CpuWindow:
    """Wall time, this process tree's CPU time and everybody else's CPU use over a ``with`` block.

    ``cpu`` counts this process, its descendants alive at the end (a local Ray session's are its
    descendants) and the children it reaped; a descendant that exits unreaped inside the block is
    missed. ``busy`` and ``others`` are in cores (1.0 = one core busy all along).
    """

    wall: float = 0.0
    cpu: float = 0.0
    machine: float = 0.0

    def __enter__(self) -> CpuWindow:
        self.started = time.perf_counter()
        self._start = (self.started, _tree_cpu_seconds(), _machine_busy_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall, cpu, machine = self._start
        self.wall = time.perf_counter() - wall
        self.cpu = sum(now - cpu.get(pid, 0.0) for pid, now in _tree_cpu_seconds().items())
        self.machine = _machine_busy_seconds() - machine

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
