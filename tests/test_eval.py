"""Evaluation suites on real test images: test-set discovery, all-in-one with baselines,
zero-shot, few-shot, the run-end view of a curriculum, grids, and ``allinone eval``."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from allinone.config import ConfigError, FewShotSection, load_pipeline
from allinone.curriculum.scoring import evaluate_run_end
from allinone.data.shards import BuildRequest, build_shards
from allinone.evaluate.continual import log_continual
from allinone.evaluate.suites import (
    MODEL,
    EvalError,
    EvalPlan,
    default_tasks_dir,
    few_shot_table,
    fine_tune,
    load_catalog,
    run_suites,
    to_markdown,
)
from allinone.evaluate.testsets import EvalDataError, benchmark_sets, discover, synthetic_sets
from conftest import REPO, SHARED_DATA, TEST_SETS, allinone_cli

TRAINED = ("denoise", "derain", "dehaze")
# A tiny PromptIR made tinier: full 481x321 test images in about a second on a busy core.
MODEL_YAML = "{name: promptir, preset: tiny, dim: 8, prompt_dims: [8, 8, 8]}"


def write_pipeline(folder: Path, eval_block: str, tasks=TRAINED, unseen=("motion_blur",)) -> Path:
    path = folder / "eval-pipeline.yaml"
    path.write_text(f"""
name: evaltest
tasks_dir: {REPO / "tasks"}
tasks: [{", ".join(tasks)}]
unseen_tasks: [{", ".join(unseen)}]
model: {MODEL_YAML}
curriculum: {{mode: cumulative, steps: [{", ".join("1" for _ in tasks)}]}}
eval: {eval_block}
""")
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    return load_pipeline(write_pipeline(folder, "{max_images: 1}"))


@pytest.fixture(scope="module")
def trained_model(pipeline):
    # Stands in for trained weights: any init other than few-shot's scratch arm (seed 0) does.
    torch.manual_seed(1234)
    return pipeline.config.model_spec.build().eval()


def make_plan(pipeline, model, **options) -> EvalPlan:
    return EvalPlan(
        model=model,
        trained=TRAINED,
        catalog=load_catalog(default_tasks_dir()),
        fresh=pipeline.config.model_spec.build,
        **options,
    )


def test_the_eval_block_configures_suites_and_few_shot(tmp_path: Path) -> None:
    block = "{suites: [all], data: ../data, baselines: true, few_shot: {k: [5, 1, 5], steps: 3}}"
    settings = load_pipeline(write_pipeline(tmp_path, block)).config.eval
    assert settings.suites == ["all"] and settings.baselines and settings.data == "../data"
    assert settings.few_shot.k == [1, 5] and settings.few_shot.steps == 3
    with pytest.raises(ConfigError, match=r"eval\.few_shot\.kk: unknown field"):
        load_pipeline(write_pipeline(tmp_path, "{few_shot: {kk: [1]}}"))
    with pytest.raises(ConfigError, match=r"eval\.suites\.0"):
        load_pipeline(write_pipeline(tmp_path, "{suites: [one-shot]}"))


# --------------------------------------------------------------------------- discovery
def test_discovery_finds_the_3_task_protocol_in_the_shared_test_data() -> None:
    for root in (TEST_SETS, SHARED_DATA):  # the sets' folder itself, or a root with test/
        found = discover(root)
        layouts = {f.standard.name: f.layout for f in found.found}
        assert layouts == {"CBSD68": "clean", "Rain100L": "rain100l", "SOTS-outdoor": "sots"}
        assert found.protocol() == "3-task"
        assert [f.standard.name for f in found.for_task("dehaze")] == ["SOTS-outdoor"]
    assert {"RNI15", "Set12"} <= set(discover(TEST_SETS).ignored)


def _link_pairs(lq_dir: Path, gt_dir: Path, names: list[str], suffix: str = ".png") -> None:
    lq_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    for i, name in enumerate(names):
        (lq_dir / f"{i:04d}{suffix}").symlink_to(TEST_SETS / "Rain100L" / "rain" / name)
        (gt_dir / f"{i:04d}{suffix}").symlink_to(TEST_SETS / "Rain100L" / "norain" / f"no{name}")


def test_discovery_of_the_5_task_layouts_and_of_an_unnamed_paired_folder(tmp_path: Path) -> None:
    for name in ("CBSD68", "Rain100L", "SOTS"):
        (tmp_path / name).symlink_to(TEST_SETS / name)
    rain = sorted(p.name for p in (TEST_SETS / "Rain100L" / "rain").iterdir())
    gopro = tmp_path / "GOPRO_Large" / "test"
    _link_pairs(gopro / "GOPR0384_11_00" / "blur", gopro / "GOPR0384_11_00" / "sharp", rain[:2])
    _link_pairs(gopro / "GOPR0385_11_01" / "blur", gopro / "GOPR0385_11_01" / "sharp", rain[2:3])
    _link_pairs(tmp_path / "LOLdataset/eval15/low", tmp_path / "LOLdataset/eval15/high", rain[:1])
    _link_pairs(tmp_path / "my_rain/rain", tmp_path / "my_rain/norain", rain[:1])

    found = discover(tmp_path)
    by_name = {f.standard.name: f for f in found.found}
    assert found.protocol() == "5-task"
    assert by_name["GoPro"].layout == "gopro" and by_name["LOL"].layout == "lol"
    assert by_name["my_rain"].standard.tasks == ("derain", "rain100l")
    catalog = load_catalog(default_tasks_dir())
    (gopro_set,) = benchmark_sets(by_name["GoPro"], "deblur", catalog["deblur"].config, 0)
    pairs = list(gopro_set.pairs())
    assert [key for key, _, _ in pairs] == [
        "deblur_GOPR0384_11_00_0000_v000",
        "deblur_GOPR0384_11_00_0001_v000",
        "deblur_GOPR0385_11_01_0000_v000",
    ]
    assert all(lq.shape == gt.shape and not np.array_equal(lq, gt) for _, lq, gt in pairs)


def test_a_test_folder_in_no_known_layout_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "Rain100L").mkdir()
    (tmp_path / "Rain100L" / "rain-001.png").symlink_to(TEST_SETS / "Rain100L/rain/rain-001.png")
    with pytest.raises(EvalDataError, match=r"Rain100L: a Rain100L folder in no known layout"):
        discover(tmp_path)
    other = tmp_path / "other"
    (other / "photos").mkdir(parents=True)
    with pytest.raises(EvalDataError, match=r"other: no test set in a known layout"):
        discover(other)
    with pytest.raises(EvalDataError, match="does not exist"):
        discover(tmp_path / "missing")


def test_a_synthetic_split_degraded_now_equals_its_built_test_shards(tmp_path: Path) -> None:
    entry = load_catalog(default_tasks_dir())["denoise"]
    config = entry.config.model_copy(
        update={"test": entry.config.test.model_copy(update={"max_images": 2})}
    )
    source = str(TEST_SETS / "CBSD68")
    build_shards(BuildRequest(config, "test", source, tmp_path / "shards", 4, seed=7))
    fresh = synthetic_sets("denoise", config, entry.path, seed=7)
    built = synthetic_sets("denoise", config, entry.path, seed=7, shards=tmp_path / "shards")
    assert (
        [s.name for s in fresh]
        == [s.name for s in built]
        == [
            "synthetic-sigma15",
            "synthetic-sigma25",
            "synthetic-sigma50",
        ]
    )
    for now, stored in zip(fresh, built, strict=True):
        pairs_now, pairs_stored = list(now.pairs()), list(stored.pairs())
        assert [k for k, _, _ in pairs_now] == [k for k, _, _ in pairs_stored]
        assert len(pairs_now) == 2
        for (_, lq_a, gt_a), (_, lq_b, gt_b) in zip(pairs_now, pairs_stored, strict=True):
            np.testing.assert_array_equal(lq_a, lq_b)
            np.testing.assert_array_equal(gt_a, gt_b)


# --------------------------------------------------------------------------- suites
def test_all_in_one_on_the_real_test_sets_with_baselines(pipeline, trained_model) -> None:
    plan = make_plan(pipeline, trained_model, data=TEST_SETS, max_images=1, tile=256)
    plan.baselines = True
    results = run_suites(plan, ["all-in-one"])
    rows = {(r.set, r.method): r for r in results.rows}
    sets = ["CBSD68-sigma15", "CBSD68-sigma25", "CBSD68-sigma50", "Rain100L", "SOTS-outdoor"]
    assert [r.set for r in results.rows if r.method == MODEL] == sets
    assert {r.task for r in results.rows} == set(TRAINED)
    for name in sets:
        model, floor = rows[(name, MODEL)], rows[(name, "input")]
        assert model.images == 1 and 3 < model.psnr < 60 and 0 < model.ssim <= 1
        assert model.psnr_y != model.psnr  # Y is its own measurement
        # The "input" baseline is the same image scored by the same code.
        assert floor.psnr == pytest.approx(model.input_psnr)
    # Noise gets stronger along the protocol, and the classical denoisers beat the noisy input.
    inputs = [rows[(f"CBSD68-sigma{s}", "input")].psnr for s in (15, 25, 50)]
    assert inputs == sorted(inputs, reverse=True)
    for method in ("tv", "nlm"):
        assert rows[("CBSD68-sigma50", method)].psnr > inputs[2] + 3
    assert ("SOTS-outdoor", "dark_channel") in rows
    # Full-size images: the grid's sample is the whole test image, not a crop.
    sample, _ = results.samples["denoise"]
    assert sample.restored.shape == (321, 481, 3) or sample.restored.shape == (481, 321, 3)
    assert "protocol: 3-task" in results.notes[0]


def test_zero_shot_and_few_shot_report_three_columns(pipeline, trained_model) -> None:
    before = {k: v.clone() for k, v in trained_model.state_dict().items()}
    plan = make_plan(
        pipeline,
        trained_model,
        max_images=1,
        few_shot=FewShotSection(k=[1], steps=2, lr=1e-3, crop=32, batch_size=2),
    )
    results = run_suites(plan, ["all"], ["motion_blur"])
    assert {(r.suite, r.method) for r in results.rows} == {
        ("zero-shot", MODEL),
        ("few-shot", "zero-shot"),
        ("few-shot", "few-shot"),
        ("few-shot", "scratch"),
    }
    (task, name, k, steps, zero, tuned, scratch), *others = few_shot_table(results)
    assert not others and (task, k, steps) == ("motion_blur", 1, 2)
    assert name == "synthetic-length15-angle45"
    assert all(math.isfinite(v) for v in (zero, tuned, scratch))
    assert len({zero, tuned, scratch}) == 3  # three different models scored on one pair
    # The held-out pair is not the one fine-tuned on: zero-shot here differs from zero-shot
    # on the set's first pair.
    (zero_shot_row,) = [r for r in results.rows if r.suite == "zero-shot"]
    assert zero_shot_row.psnr != zero
    # Fine-tuning works on a copy: the evaluated model is untouched.
    after = trained_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "| few-shot | motion_blur |" in to_markdown(results)


def test_fine_tuning_lowers_the_loss_on_its_pairs(pipeline, trained_model) -> None:
    rng = np.random.default_rng(0)
    gt = rng.random((48, 48, 3), dtype=np.float32)
    lq = np.clip(gt + rng.normal(0, 0.2, gt.shape), 0, 1).astype(np.float32)
    pairs = [("p", lq, gt)]
    settings = FewShotSection(k=[1], steps=15, lr=2e-3, crop=32, batch_size=2)

    def loss(model) -> float:
        with torch.no_grad():
            out = model(torch.from_numpy(lq.transpose(2, 0, 1))[None])
        return float((out[0].numpy().transpose(1, 2, 0) - gt).__abs__().mean())

    tuned = fine_tune(trained_model, None, pairs, settings, seed=0)
    assert loss(tuned) < 0.8 * loss(trained_model)


class BorderRuin(torch.nn.Module):
    """Returns its input with a frame of ``width`` pixels blacked out: wrong only at the border."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.gain = torch.nn.Parameter(torch.ones(()))  # a restorer's weights live on a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * self.gain
        if self.width:
            inner = out[..., self.width : -self.width, self.width : -self.width]
            out = torch.nn.functional.pad(inner, [self.width] * 4)
        return out


def test_sr_scores_ignore_the_border_its_protocol_drops() -> None:
    def model_psnr(model: torch.nn.Module, task: str) -> float:
        catalog = load_catalog(default_tasks_dir())
        plan = EvalPlan(model=model, trained=(task,), catalog=catalog, max_images=1)
        return run_suites(plan, ["all-in-one"]).rows[0].psnr

    assert load_catalog(default_tasks_dir())["sr"].config.crop_border == 4
    # SR ignores 4 px at each border: ruining exactly those costs nothing.
    assert model_psnr(BorderRuin(4), "sr") == model_psnr(BorderRuin(0), "sr")
    # Denoising scores every pixel: the same ruin costs dBs.
    assert model_psnr(BorderRuin(4), "denoise") < model_psnr(BorderRuin(0), "denoise") - 1


def test_unknown_and_misplaced_tasks_are_clear_errors(pipeline, trained_model) -> None:
    plan = make_plan(pipeline, trained_model, max_images=1)
    with pytest.raises(EvalError, match=r"unknown task 'fog' \(known: "):
        run_suites(plan, ["zero-shot"], ["fog"])
    with pytest.raises(EvalError, match="'denoise' is a trained task"):
        run_suites(plan, ["zero-shot"], ["denoise"])
    with pytest.raises(EvalError, match="'snow' was not trained on"):
        run_suites(plan, ["all-in-one"], ["snow"])
    plan.few_shot = FewShotSection(k=[20])
    with pytest.raises(EvalError, match="k=20 needs more than 20 pairs"):
        run_suites(plan, ["few-shot"], ["snow"])


# --------------------------------------------------------------------------- in MLflow
def test_run_end_logs_suites_grids_and_the_continual_view(tmp_path: Path) -> None:
    block = "{suites: [zero-shot], max_images: 1, tile: 256}"
    pipeline = load_pipeline(write_pipeline(tmp_path, block, tasks=("denoise", "dehaze")))
    weights = tmp_path / "model.pt"
    torch.save(pipeline.config.model_spec.build().state_dict(), weights)
    matrix = {
        "stage1-denoise": {"denoise": 25.0},
        "stage2-dehaze": {"denoise": 24.0, "dehaze": 18.0},
    }
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        numbers = log_continual(matrix, [("denoise",), ("denoise", "dehaze")])
        results = evaluate_run_end(pipeline, tmp_path / "work", weights, say=lambda *_: None)
    assert numbers == {
        "continual/average_psnr": 21.0,
        "continual/forgetting": 1.0,
        "continual/bwt": -1.0,
    }
    assert [(r.suite, r.task) for r in results.rows] == [("zero-shot", "motion_blur")]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["continual/forgetting"] == 1.0
    name = "eval/zero-shot/motion_blur/synthetic-length15-angle45/model/psnr"
    assert logged[name] == pytest.approx(results.rows[0].psnr)
    assert logged["eval/zero-shot/average_psnr"] == pytest.approx(results.rows[0].psnr)
    artifacts = {
        f.path
        for folder in ("continual", "eval", "grids")
        for f in client.list_artifacts(run.info.run_id, folder)
    }
    assert artifacts == {
        "continual/stage_matrix.md",
        "continual/stage_matrix.png",
        "eval/results.json",
        "eval/results.md",
        "grids/motion_blur.png",
    }
    grid = Path(client.download_artifacts(run.info.run_id, "grids/motion_blur.png", str(tmp_path)))
    with Image.open(grid) as image:
        assert image.width == 1200 and image.height > 300  # three 4-inch panels at 100 dpi


# --------------------------------------------------------------------------- the CLI
def _allinone(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return allinone_cli(*args, cwd=cwd, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def checkpoint(pipeline, trained_model, tmp_path_factory) -> Path:
    """A stage-style checkpoint: model.pt with the card that names its architecture."""
    from allinone.tracking.resolve import write_model_card

    weights = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    torch.save(trained_model.state_dict(), weights)
    write_model_card(weights, pipeline.config, "stage3-dehaze")
    return weights


def test_cli_eval_prints_the_tables_and_logs_to_mlflow(checkpoint: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = _allinone(
        "eval", "--model", str(checkpoint), "--suite", "all", "--tasks", "derain,motion_blur",
        "--data", str(TEST_SETS), "--max-images", "1", "--tile", "256", "--k", "1",
        "--steps", "1", "--baselines", "--tracking-uri", uri, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for text in ("all-in-one", "Rain100L", "zero-shot", "synthetic-length15-angle45", "scratch"):
        assert text in out
    assert "protocol: 3-task" in out and "Few-shot PSNR (dB) on held-out pairs" in out
    run_id = out.split("logged to MLflow run ")[1].split()[0]
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    assert "eval/all-in-one/derain/Rain100L/model/psnr" in metrics
    assert "eval/all-in-one/derain/Rain100L/input/psnr" in metrics  # the --baselines rows
    assert "eval/few-shot/motion_blur/synthetic-length15-angle45/scratch-k1/psnr" in metrics
    grids = [f.path for f in client.list_artifacts(run_id, "grids")]
    assert grids == ["grids/derain.png", "grids/motion_blur.png"]


def test_cli_eval_errors_are_one_line(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "SOTS").mkdir()  # named like a test set, laid out like none
    for args, message in (
        (
            ["--data", str(tmp_path)],
            "SOTS-outdoor folder in no known layout (expected hazy/ + clear/)",
        ),
        (["--tasks", "fog"], "unknown task 'fog'"),
    ):
        done = _allinone("eval", "--model", str(checkpoint), *args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_a_bad_eval_data_folder_stops_the_run_before_training(tmp_path: Path) -> None:
    from allinone.curriculum.run import RunOptions, run_pipeline

    (tmp_path / "empty").mkdir()
    pipeline = load_pipeline(write_pipeline(tmp_path, f"{{data: {tmp_path / 'empty'}}}"))
    with pytest.raises(EvalDataError, match="no test set in a known layout"):
        run_pipeline(pipeline, RunOptions(tmp_path / "work"), say=lambda *_: None)
    assert not list((tmp_path / "work").glob("shards/*")), "nothing built before the check"
