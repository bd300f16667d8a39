"""The continual-learning view of a curriculum: the stage x task score matrix and what it shows.

After every curriculum stage each task is evaluated, giving R[l, j], the PSNR on task j after
stage l (NaN where task j was not evaluated). From it:

* average PSNR: the final model's mean over tasks (the all-in-one number papers compare);
* forgetting (Chaudhry et al., 2018): how far each task fell from its best earlier score;
* backward transfer (Lopez-Paz and Ranzato, 2017): how later stages changed each task's score
  relative to when it was learned (negative = forgetting, positive = later tasks helped).

Both transfer measures need to know when each task was learned: ``learned_at[task]`` is the index
of the first stage that trained on it. Tasks learned in the final stage have no later stage to
forget in, and tasks never learned (zero-shot) have nothing to forget, so both are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass
class StageMatrix:
    """PSNR (or any higher-is-better score) of every task after every stage."""

    tasks: list[str]
    stages: list[str]
    values: np.ndarray  # shape (n_stages, n_tasks); NaN where a task was not evaluated

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        expected = (len(self.stages), len(self.tasks))
        if self.values.shape != expected:
            raise ValueError(
                f"values has shape {self.values.shape}, expected (stages, tasks) = {expected}"
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"duplicate task names in {self.tasks}")

    @classmethod
    def from_stage_results(
        cls, results: Mapping[str, Mapping[str, float]], tasks: Sequence[str] | None = None
    ) -> StageMatrix:
        """Build from ``{stage: {task: psnr}}`` in stage order; missing scores become NaN.

        Tasks are ordered as given, or in order of first appearance.
        """
        if tasks is None:
            tasks = list(dict.fromkeys(task for scores in results.values() for task in scores))
        rows = [[scores.get(task, math.nan) for task in tasks] for scores in results.values()]
        values = np.array(rows, dtype=np.float64).reshape(len(results), len(tasks))
        return cls(list(tasks), list(results), values)

    def column(self, task: str) -> np.ndarray:
        return self.values[:, self.tasks.index(task)]


def first_learned(stage_tasks: Sequence[Sequence[str]]) -> dict[str, int]:
    """``learned_at`` from a curriculum's task lists: the first stage index training each task."""
    learned: dict[str, int] = {}
    for index, tasks in enumerate(stage_tasks):
        for task in tasks:
            learned.setdefault(task, index)
    return learned


def first_evaluated(m: StageMatrix) -> dict[str, int]:
    """Default ``learned_at``: the first stage with a score, which is right for a curriculum
    that evaluates only the tasks trained so far."""
    learned: dict[str, int] = {}
    for j, task in enumerate(m.tasks):
        scored = np.flatnonzero(~np.isnan(m.values[:, j]))
        if scored.size:
            learned[task] = int(scored[0])
    return learned


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else math.nan


def average_psnr(m: StageMatrix) -> float:
    """Mean over tasks of the final stage's scores (tasks not evaluated there are skipped)."""
    final = m.values[-1]
    final = final[~np.isnan(final)]
    return float(final.mean()) if final.size else math.nan


def _earlier_tasks(m: StageMatrix, learned_at: Mapping[str, int] | None) -> list[tuple[int, int]]:
    """(column, learned stage) of tasks learned before the final stage and scored at its end."""
    learned_at = first_evaluated(m) if learned_at is None else learned_at
    final = len(m.stages) - 1
    pairs = []
    for j, task in enumerate(m.tasks):
        stage = learned_at.get(task)
        if stage is not None and stage < final and not np.isnan(m.values[final, j]):
            pairs.append((j, stage))
    return pairs


def forgetting(m: StageMatrix, learned_at: Mapping[str, int] | None = None) -> float:
    """Mean over earlier-learned tasks of (best score from learning until the final stage,
    exclusive) minus final score. Positive = the final model lost ground; NaN if no such task."""
    drops = []
    for j, stage in _earlier_tasks(m, learned_at):
        earlier = m.values[stage:-1, j]
        earlier = earlier[~np.isnan(earlier)]
        if earlier.size:
            drops.append(float(earlier.max() - m.values[-1, j]))
    return _mean(drops)


def backward_transfer(m: StageMatrix, learned_at: Mapping[str, int] | None = None) -> float:
    """Mean over earlier-learned tasks of (final score - score right after the task's stage)."""
    changes = []
    for j, stage in _earlier_tasks(m, learned_at):
        if not np.isnan(m.values[stage, j]):
            changes.append(float(m.values[-1, j] - m.values[stage, j]))
    return _mean(changes)


def to_markdown(m: StageMatrix, digits: int = 2) -> str:
    """GitHub-flavoured table: one row per stage, one column per task, plus the row mean."""

    def cell(value: float) -> str:
        return "-" if np.isnan(value) else f"{value:.{digits}f}"

    lines = [
        "| stage | " + " | ".join(m.tasks) + " | mean |",
        "|---|" + "---:|" * (len(m.tasks) + 1),
    ]
    for name, row in zip(m.stages, m.values, strict=True):
        scored = row[~np.isnan(row)]
        mean = float(scored.mean()) if scored.size else math.nan
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in row) + f" | {cell(mean)} |")
    return "\n".join(lines) + "\n"


def heatmap_png(m: StageMatrix, path: str | Path, title: str = "PSNR (dB)", dpi: int = 100) -> Path:
    """Write the matrix as an annotated heatmap (stages down, tasks across); returns the path.

    Drawn on a bare ``Figure`` with the Agg canvas rather than pyplot, so it needs no display,
    touches no global figure state and is safe inside Ray workers.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_stages, n_tasks = m.values.shape
    fig = Figure(figsize=(2.0 + 0.9 * n_tasks, 1.2 + 0.5 * n_stages), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(m.values)
    image = ax.imshow(masked, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(n_tasks), labels=m.tasks, rotation=30, ha="right")
    ax.set_yticks(range(n_stages), labels=m.stages)
    ax.set_title(title)
    _annotate(ax, m.values)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def _annotate(ax: Axes, values: np.ndarray) -> None:
    """Write each score in its cell, dark on light colours and light on dark ones."""
    finite = values[~np.isnan(values)]
    if not finite.size:
        return
    middle = (finite.min() + finite.max()) / 2.0
    for (row, col), value in np.ndenumerate(values):
        if np.isnan(value):
            continue
        colour = "black" if value > middle else "white"  # viridis is light at the top end
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=8)


def summarise(
    results: Mapping[str, Mapping[str, float]],
    stage_tasks: Sequence[Sequence[str]],
    tasks: Sequence[str] | None = None,
) -> tuple[StageMatrix, dict[str, float]]:
    """The matrix of ``{stage: {task: psnr}}`` and its finite summary numbers."""
    m = StageMatrix.from_stage_results(results, tasks)
    learned = first_learned(stage_tasks)
    numbers = {
        "continual/average_psnr": average_psnr(m),
        "continual/forgetting": forgetting(m, learned),
        "continual/bwt": backward_transfer(m, learned),
    }
    # One stage (or one task) has nothing to forget: leave such numbers out rather than log NaN.
    return m, {name: value for name, value in numbers.items() if not math.isnan(value)}


def log_continual(
    results: Mapping[str, Mapping[str, float]],
    stage_tasks: Sequence[Sequence[str]],
    tasks: Sequence[str] | None = None,
) -> dict[str, float]:
    """Log the continual-learning view to the active MLflow run: the summary numbers as metrics,
    the matrix as ``continual/stage_matrix.md`` and as ``continual/stage_matrix.png``."""
    import tempfile

    import mlflow

    m, numbers = summarise(results, stage_tasks, tasks)
    mlflow.log_metrics(numbers)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "stage_matrix.md").write_text(to_markdown(m))
        heatmap_png(m, Path(folder) / "stage_matrix.png", title="PSNR (dB): task x stage")
        mlflow.log_artifacts(folder, "continual")
    return numbers
