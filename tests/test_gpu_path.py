"""The GPU recipe's code path on this CPU: channels_last and torch.compile through the real
stage loop (Ray Train + DeepSpeed) with ``use_gpu: false``, and ``benchmarks/gpu.py``'s one line
on a machine without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from allinone.config import load_pipeline
from allinone.curriculum.run import run_pipeline
from allinone.curriculum.state import RunOptions
from conftest import REPO
from test_curriculum import write_pipeline


def test_channels_last_and_compile_train_a_stage(tmp_path: Path, ray_session) -> None:
    # "eager" runs torch.compile's graph capture without generating code: the same path as
    # "inductor" on a GPU, in seconds on a CPU.
    path = write_pipeline(
        tmp_path,
        "nhwc",
        tasks=("denoise",),
        steps=(3,),
        train=", zero_stage: 0, channels_last: true, compile: eager",
    )
    summary = run_pipeline(
        load_pipeline(path), RunOptions(tmp_path / "work", register=False), say=lambda *_: None
    )
    assert list(summary.matrix) == ["stage1-denoise"]
    assert all(torch.isfinite(torch.tensor(v)) for v in summary.matrix["stage1-denoise"].values())
    weights = torch.load(summary.weights, weights_only=True)
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_the_gpu_benchmark_says_in_one_line_that_it_needs_cuda() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and lines == [
        "benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here"
    ]
