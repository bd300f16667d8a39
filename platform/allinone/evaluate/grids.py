"""Pictures of what the numbers mean: degraded / restored / ground truth, side by side.

One PNG per evaluated task, each panel titled with its PSNR against the ground truth. Drawn on a
bare matplotlib ``Figure`` with the Agg canvas (no display, no global pyplot state), so it is
safe in a Ray worker or a headless driver. MLflow keeps them under ``grids/``, where run reports
collect them.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from allinone.evaluate.scoring import Sample

GRIDS_DIR = "grids"
PANEL_INCHES = 4.0  # width of each of the three panels


def grid_png(sample: Sample, path: str | Path, title: str, dpi: int = 100) -> Path:
    """Write ``sample`` as a three-panel PNG at ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = sample.target.shape[:2]
    panel_height = PANEL_INCHES * height / width
    fig = Figure(figsize=(3 * PANEL_INCHES, panel_height + 0.8), dpi=dpi)
    FigureCanvasAgg(fig)
    panels = (
        (sample.degraded, f"degraded {sample.input_psnr:.2f} dB"),
        (sample.restored, f"restored {sample.psnr:.2f} dB"),
        (sample.target, "ground truth"),
    )
    for i, (image, caption) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 3, i)
        ax.imshow(image.clip(0.0, 1.0), interpolation="nearest")
        ax.set_title(caption, fontsize=10)
        ax.set_axis_off()
    fig.suptitle(f"{title} ({sample.key})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def artifact_name(task: str) -> str:
    """The grid's file name under ``grids/``: the task name, safe as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task) + ".png"


def log_grid(sample: Sample, task: str, title: str | None = None, run_id: str | None = None) -> str:
    """Draw ``sample`` and log it as ``grids/<task>.png`` to a run (default: the active one)."""
    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        path = grid_png(sample, Path(folder) / artifact_name(task), title or task)
        if run_id is None:
            mlflow.log_artifact(str(path), GRIDS_DIR)
        else:
            mlflow.MlflowClient().log_artifact(run_id, str(path), GRIDS_DIR)
    return f"{GRIDS_DIR}/{artifact_name(task)}"
