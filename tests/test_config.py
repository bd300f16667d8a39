"""Typed configs: every shipped YAML loads; a bad one gets ONE message naming file and field."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from allinone.config import ConfigError, expand_env, load_pipeline, load_task
from conftest import REPO, allinone_cli

TASKS = sorted((REPO / "tasks").glob("*.yaml"))
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", TASKS, ids=lambda p: p.stem)
def test_every_shipped_task_loads(path: Path) -> None:
    task = load_task(path)
    assert task.name == path.stem


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_every_shipped_pipeline_loads(path: Path) -> None:
    pipeline = load_pipeline(path)
    assert set(pipeline.config.tasks) <= set(pipeline.tasks)


def test_directional_degradations_are_not_turned_in_training(tmp_path: Path) -> None:
    names = ("denoise", "deblur", "derain", "dehaze", "snow", "rain100l", "sots", "pairs")
    turns = {name: load_task(REPO / "tasks" / f"{name}.yaml").turns_in_training for name in names}
    assert turns == {
        "denoise": True,
        "deblur": True,
        "derain": False,  # rain falls down
        "dehaze": True,  # measured: SOTS is better with turns
        "snow": True,  # round flakes
        "rain100l": False,
        "sots": True,
        "pairs": True,  # any lq/gt pairs: the user says otherwise with train.turns
    }
    told = tmp_path / "derain.yaml"
    told.write_text("name: derain\nkind: synthetic\ndegrade: [{op: rain}]\ntrain: {turns: true}\n")
    assert load_task(told).turns_in_training


def test_the_seven_miour_tasks_and_unseen_ones_exist() -> None:
    names = {p.stem for p in TASKS}
    assert {"sr", "deblur", "denoise", "jpeg", "derain", "dehaze", "lowlight"} <= names
    unseen = [p.stem for p in TASKS if load_task(p).unseen]
    assert len(unseen) >= 3


BAD_TASKS = {
    "noise sigma below zero": (
        "degrade:\n  - {op: gaussian_noise, sigma: -1}",
        "degrade.0",
        "sigma",
    ),
    "jpeg quality above 100": ("degrade:\n  - {op: jpeg, quality: 101}", "degrade.0", "quality"),
    "jpeg quality zero": ("degrade:\n  - {op: jpeg, quality: [0, 50]}", "degrade.0", "quality"),
    "even blur kernel": ("degrade:\n  - {op: gaussian_blur, kernel: 8}", "degrade.0", "odd"),
    "blur kernel below 3": ("degrade:\n  - {op: gaussian_blur, kernel: 1}", "degrade.0", "kernel"),
    "haze beta zero": ("degrade:\n  - {op: haze, beta: 0}", "degrade.0", "beta"),
    "unknown op": ("degrade:\n  - {op: fog}", "degrade.0", "unknown degradation op 'fog'"),
    "typo'd key": ("degrade:\n  - {op: haze}\ntrian: {variants: 2}", "trian", "unknown field"),
    "typo'd param": ("degrade:\n  - {op: haze, bta: 1}", "degrade.0", "unknown parameter 'bta'"),
    "inverted range": (
        "degrade:\n  - {op: gaussian_noise, sigma: [50, 15]}",
        "degrade.0",
        "inverted",
    ),
    "level naming no op param": (
        "degrade:\n  - {op: haze}\ntest: {levels: [{sigma: 2}]}",
        "test.levels.0.sigma",
        "no op",
    ),
}


@pytest.mark.parametrize("case", BAD_TASKS, ids=str)
def test_bad_task_names_file_and_field(tmp_path: Path, case: str) -> None:
    body, field, words = BAD_TASKS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: bad\nkind: synthetic\n{body}\n")
    with pytest.raises(ConfigError) as caught:
        load_task(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and field in message and words in message


def test_bad_pipeline_fields(tmp_path: Path) -> None:
    base = (REPO / "pipelines" / "smoke.yaml").read_text()
    cases = {
        "tasks: [denoise, dehaze]": ("tasks: [denoise, nosuchtask]", "tasks.1", "unknown task"),
        "steps: [6, 6]": ("steps: [6]", "(top level)", "2 stage length"),
        "zero_stage: 2": ("zero_stage: 4", "train.zero_stage", "less than or equal to 3"),
        "name: promptir": ("name: nosuchmodel", "model.name", "unknown model"),
        "crop: 32,": ("crop: 32, train_sources: {derain: /x},", "data.train_sources", "derain"),
    }
    for original, (replacement, field, words) in cases.items():
        path = tmp_path / "pipelines" / "p.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            base.replace(original, replacement).replace("seed: 0", f"tasks_dir: {REPO / 'tasks'}")
        )
        with pytest.raises(ConfigError) as caught:
            load_pipeline(path)
        assert field in str(caught.value) and words in str(caught.value), str(caught.value)


def test_missing_data_folder_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nkind: paired\nlayout: sots\ntest: {source: ./nowhere}\n")
    result = _cli("shards", "build", str(path), "--split", "test", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "test.source" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nkind: synthetic\ndegrade:\n  - {op: jpeg, quality: 0}\n")
    result = _cli("shards", "build", str(path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.yaml" in lines[0] and "quality" in lines[0]


def test_config_check_tells_a_task_from_a_pipeline_by_its_content(tmp_path: Path) -> None:
    task = tmp_path / "elsewhere" / "noise.yaml"  # not in a tasks/ folder
    task.parent.mkdir()
    task.write_text("name: noise\nkind: synthetic\ndegrade:\n  - {op: gaussian_noise}\n")
    checked = _cli("config", "check", str(task), str(REPO / "pipelines" / "quickstart.yaml"))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.count(": ok") == 2
    task.write_text("name: noise\nkind: synthetic\ndegrade:\n  - {op: jpeg, quality: 0}\n")
    bad = _cli("config", "check", str(task))
    assert bad.returncode == 2 and "degrade.0" in bad.stderr, bad.stderr  # judged as a task
    other = tmp_path / "notes.yaml"
    other.write_text("title: not a config\n")
    neither = _cli("config", "check", str(other))
    assert neither.returncode == 2 and "neither a task" in neither.stderr


def test_invalid_yaml_is_one_line_with_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nkind: synthetic\ndegrade: [\n  {op: jpeg\n")
    with pytest.raises(ConfigError) as caught:
        load_task(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not valid YAML: line ") and ", column " in message
    result = _cli("config", "check", str(path))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "broken.yaml" in lines[0], lines


def test_env_expansion() -> None:
    assert expand_env("${ALLINONE_SURELY_UNSET:-a/b}/c") == "a/b/c"
    with pytest.raises(ValueError, match="ALLINONE_SURELY_UNSET"):
        expand_env("${ALLINONE_SURELY_UNSET}")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return allinone_cli(*args, cwd=REPO, timeout=120)


def test_per_task_sources_take_precedence(tmp_path: Path) -> None:
    from allinone.curriculum.shards import _split_source

    path = tmp_path / "p.yaml"
    path.write_text(
        (REPO / "pipelines" / "smoke.yaml")
        .read_text()
        .replace("seed: 0", f"tasks_dir: {REPO / 'tasks'}")
        .replace("crop: 32,", "crop: 32, train_source: photos, train_sources: {dehaze: hazy},")
    )
    pipeline = load_pipeline(path)
    assert _split_source(pipeline, "dehaze", "train")[::2] == ("hazy", "data.train_sources.dehaze")
    assert _split_source(pipeline, "denoise", "train")[::2] == ("photos", "data.train_source")
    assert _split_source(pipeline, "denoise", "test")[2] == "test.source"


def _smoke_with(tmp_path: Path, original: str, replacement: str) -> Path:
    path = tmp_path / "p.yaml"
    base = (REPO / "pipelines" / "smoke.yaml").read_text()
    assert original in base
    path.write_text(
        base.replace(original, replacement).replace("seed: 0", f"tasks_dir: {REPO / 'tasks'}")
    )
    return path


@pytest.mark.parametrize(
    ("original", "replacement", "field"),
    [
        ("lr: 1.0e-3", "lr: .inf", "train.lr"),
        ("lr: 1.0e-3", "lr: .nan", "train.lr"),
        ("lr: 1.0e-3", "lr: 1.0e-3, grad_clip: -.inf", "train.grad_clip"),
        ("preset: tiny", "preset: tiny, prompt_len: .inf", "prompt_len"),
    ],
)
def test_non_finite_numbers_are_refused_with_the_field(
    tmp_path: Path, original: str, replacement: str, field: str
) -> None:
    path = _smoke_with(tmp_path, original, replacement)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as caught:
        load_pipeline(path)
    assert "finite" in str(caught.value)
    checked = _cli("config", "check", str(path))
    lines = [line for line in checked.stderr.splitlines() if line.strip()]
    assert checked.returncode == 2 and len(lines) == 1 and field in lines[0], checked.stderr


def test_an_unset_variable_in_tasks_dir_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        (REPO / "pipelines" / "smoke.yaml")
        .read_text()
        .replace("seed: 0", "tasks_dir: ${ALLINONE_SURELY_UNSET}/tasks")
    )
    for verb in (("config", "check", str(path)), ("run", str(path), "--workdir", str(tmp_path))):
        result = _cli(*verb)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "tasks_dir" in lines[0] and "ALLINONE_SURELY_UNSET" in lines[0]


def test_an_unset_variable_in_a_source_fails_config_check(tmp_path: Path) -> None:
    unset = "${ALLINONE_SURELY_UNSET}/photos"
    pipeline = _smoke_with(tmp_path, "crop: 32,", f"crop: 32, train_source: '{unset}',")
    task = tmp_path / "noise.yaml"
    task.write_text(
        "name: noise\nkind: synthetic\ndegrade: [{op: gaussian_noise}]\n"
        f"test: {{source: '{unset}'}}\n"
    )
    for path, field in ((pipeline, "data.train_source"), (task, "test.source")):
        result = _cli("config", "check", str(path))
        assert result.returncode == 2, result.stderr
        assert field in result.stderr and "ALLINONE_SURELY_UNSET" in result.stderr
