"""``allinone data check``: the standard datasets in their download layouts, found and surveyed per
task, on the real sets beside the project and on a small tree of every layout built from real
photos."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from allinone.config import load_task
from allinone.data.shards import BuildRequest, build_shards
from allinone.evaluate.inventory import check_data
from allinone.evaluate.testsets import EvalDataError, discover
from conftest import CLEAN_PHOTOS, REPO, SHARED_DATA, allinone_cli

PHOTOS = sorted(CLEAN_PHOTOS.glob("*.jpg"))


def test_the_real_sets_beside_the_project() -> None:
    result = allinone_cli("data", "check", SHARED_DATA)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    test = SHARED_DATA / "test"
    expected = {
        "denoise": f"  CBSD68 (test): 68 clean images, 321x481 .. 321x481  {test / 'CBSD68'}",
        "derain": f"  Rain100L (test): 10 rain100l pairs, 320x480 .. 320x480, also for rain100l  "
        f"{test / 'Rain100L'}",
        "dehaze": f"  SOTS-outdoor (test): 2 sots pairs, 550x413 .. 550x413, also for sots  "
        f"{test / 'SOTS'}",
    }
    for task, line in expected.items():
        assert lines[lines.index(task) + 1] == line, result.stdout
    assert any(line.startswith("  CSun_Hays80: 80 images, ") for line in lines), result.stdout


def photo(path: Path, index: int, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(PHOTOS[index]).convert("RGB").resize(size).save(path)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Every layout as its dataset downloads, two or three real photos each."""
    root = tmp_path_factory.mktemp("datasets")
    for i in range(3):
        photo(root / "Train" / "Denoise" / "BSD400" / f"{100 + i}.png", i)
    (root / "Train" / "Denoise" / "BSD400" / "broken.png").write_bytes(b"not an image")
    for i in range(2):
        photo(root / "Train" / "Denoise" / "WED" / "pristine_images" / f"{i:05d}.bmp", i)
    rain = root / "RainTrainL"  # as released: both sides in one folder
    for n in (1, 2):
        photo(rain / f"rain-{n}.png", n), photo(rain / f"norain-{n}.png", n)
    photo(rain / "rain-3.png", 3)  # its clean side is missing
    ots = root / "RESIDE" / "OTS"
    photo(ots / "haze" / "part1" / "0001_0.8_0.2.jpg", 4)
    photo(ots / "haze" / "part2" / "0001_1_0.08.jpg", 4)
    photo(ots / "clear" / "clear" / "0001.jpg", 4)
    photo(root / "RESIDE" / "ITS" / "hazy" / "1_1_0.90179.png", 5)
    photo(root / "RESIDE" / "ITS" / "clear" / "1.png", 5)
    sots = root / "RESIDE" / "SOTS" / "outdoor"  # RESIDE's own names: hazy/ + gt/
    photo(sots / "hazy" / "0002_0.8_0.2.jpg", 6), photo(sots / "gt" / "0002.png", 6)
    for split, sequence in (("train", "GOPR0372_07_00"), ("test", "GOPR0384_11_00")):
        for side in ("blur", "sharp"):
            photo(root / "GOPRO_Large" / split / sequence / side / "000047.png", 7)
    for split, size in (("our485", (64, 48)), ("eval15", (60, 48))):
        photo(root / "LOLdataset" / split / "low" / "1.png", 8, size)
        photo(root / "LOLdataset" / split / "high" / "1.png", 8)
    photo(root / "DF2K" / "DIV2K_train_HR" / "0001.png", 9, (96, 64))
    photo(root / "DF2K" / "Flickr2K" / "Flickr2K_HR" / "000001.png", 10, (80, 64))
    return root


def test_every_layout_is_found_with_its_split_and_counts(tree: Path) -> None:
    surveys = {(s.name, s.split): s for s in check_data(tree)}
    counts = {key: s.count for key, s in surveys.items()}
    assert counts == {
        ("BSD400", "train"): 3,
        ("WED", "train"): 2,
        ("RainTrainL", "train"): 2,
        ("OTS", "train"): 2,
        ("ITS", "train"): 1,
        ("SOTS-outdoor", "test"): 1,
        ("GoPro", "train"): 1,
        ("GoPro", "test"): 1,
        ("LOL", "train"): 1,
        ("LOL", "test"): 1,
        ("DIV2K", "train"): 1,
        ("Flickr2K", "train"): 1,
    }
    assert surveys["BSD400", "train"].tasks == ("denoise",)
    assert [p.file for p in surveys["BSD400", "train"].unreadable] == [
        str(tree / "Train" / "Denoise" / "BSD400" / "broken.png")
    ]
    assert [p.file for p in surveys["RainTrainL", "train"].unpaired] == [
        str(tree / "RainTrainL" / "rain-3.png")
    ]
    assert surveys["LOL", "test"].mismatched == 1 and surveys["LOL", "train"].mismatched == 0
    assert surveys["DIV2K", "train"].smallest == (96, 64)
    assert "sr" in surveys["Flickr2K", "train"].tasks


def test_the_command_names_the_problems_and_fails(tree: Path) -> None:
    result = allinone_cli("data", "check", tree)
    assert result.returncode == 1
    assert "RainTrainL (train): 2 rain100l pairs, 64x48 .. 64x48, 1 unpaired" in result.stdout
    assert f"{tree / 'RainTrainL' / 'rain-3.png'}: no ground truth" in result.stderr
    assert "broken.png: not a readable image" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_folder_without_any_image_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    with pytest.raises(EvalDataError, match="no dataset in a known layout"):
        check_data(tmp_path / "empty")
    result = allinone_cli("data", "check", tmp_path / "nowhere")
    assert result.returncode == 2 and "data folder does not exist" in result.stderr


def test_the_new_layouts_build_shards_and_evaluate(tree: Path, tmp_path: Path) -> None:
    def build(task: str, source: Path, out: str):
        request = BuildRequest(load_task(REPO / "tasks" / f"{task}.yaml"), "train", str(source),
                               tmp_path / out, 8, 0, skip_bad=True)  # fmt: skip
        return build_shards(request)

    assert build("rain100l", tree / "RainTrainL", "rain")["samples"] == 2
    assert build("sots", tree / "RESIDE" / "OTS", "ots")["samples"] == 2
    found = discover(tree / "RESIDE").for_task("dehaze")  # RESIDE's hazy/ + gt/ tests too
    sots = tree / "RESIDE" / "SOTS" / "outdoor"
    assert ("SOTS-outdoor", sots) in [(f.standard.name, f.root) for f in found]
