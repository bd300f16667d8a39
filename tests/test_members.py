"""Shards whose pixels are raw .npy arrays: built, checked, streamed and scored as PNG shards are,
read by a plain ``webdataset`` reader, and never unpickled."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from allinone.config import ConfigError, load_task
from allinone.data.images import ImageReadError
from allinone.data.members import decode_member, decode_pair_float, member_size
from allinone.data.shards import BuildRequest, build_shards, iter_tar_samples, verify_shards
from allinone.data.stream import read_crops, task_shards
from allinone.evaluate.scoring import test_pairs as built_test_pairs
from conftest import CLEAN_PHOTOS

PHOTOS = sorted(CLEAN_PHOTOS.glob("*.jpg"))[:2]
CROP = 24


def build(root: Path, members: str) -> Path:
    """2 photos x 3 variants of 40 px noisy crops for training, and 2 test pairs, in ``members``."""
    photos = root / "photos"
    photos.mkdir(exist_ok=True)
    for photo in PHOTOS:
        (photos / photo.name).write_bytes(photo.read_bytes())
    task = root / f"noise_{members}.yaml"
    task.write_text(
        "name: noise\nkind: synthetic\ndegrade:\n  - {op: gaussian_noise}\n"
        f"train: {{variants: 3, crop: 40, members: {members}}}\n"
        f"test: {{crop: 40, members: {members}}}\n"
    )
    out = root / members
    for split in ("train", "test"):
        request = BuildRequest(load_task(task), split, str(photos), out / split, 4)
        build_shards(request)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("members")
    return {members: build(root, members) for members in ("png", "npy")}


def test_npy_shards_hold_arrays_and_pass_the_check(built) -> None:
    shard = task_shards(built["npy"] / "train", "noise", 0).urls[0]
    key, members = next(iter_tar_samples(Path(shard)))
    assert set(members) == {"lq.npy", "gt.npy", "json"}
    assert np.load(io.BytesIO(members["gt.npy"]), allow_pickle=False).shape == (40, 40, 3)
    report = verify_shards(built["npy"])
    assert report.problems == [] and report.samples == 6 + 2


def test_npy_members_stream_the_crops_png_members_stream(built) -> None:
    """The same build in either format: equal pixels, so the same windows cut the same crops."""
    png, npy = (task_shards(built[m] / "train", "noise", 0) for m in ("png", "npy"))
    assert png.counts == npy.counts
    for png_url, npy_url, count in zip(png.urls, npy.urls, png.counts, strict=True):
        read = {"task_id": 0, "samples": count, "limit": 2 * count, "seed": 3}
        read |= {"crops": 2, "turns": True}
        from_png = list(read_crops(read | {"url": png_url}, CROP))
        from_npy = list(read_crops(read | {"url": npy_url}, CROP))
        assert len(from_npy) == 2 * count
        for a, b in zip(from_png, from_npy, strict=True):
            assert np.array_equal(a["lq"], b["lq"]) and np.array_equal(a["gt"], b["gt"])
            assert b["lq"].flags.writeable and b["lq"].flags.c_contiguous


def test_npy_test_shards_score_the_pairs_png_ones_do(built) -> None:
    png = list(built_test_pairs(built["png"] / "test", "noise"))
    npy = list(built_test_pairs(built["npy"] / "test", "noise"))
    assert [key for key, _, _ in npy] == [key for key, _, _ in png] and len(npy) == 2
    for (_, lq_png, gt_png), (_, lq_npy, gt_npy) in zip(png, npy, strict=True):
        assert lq_npy.dtype == np.float32
        assert np.array_equal(lq_png, lq_npy) and np.array_equal(gt_png, gt_npy)


def test_a_plain_webdataset_reader_decodes_npy_members(built) -> None:
    import webdataset as wds

    url = task_shards(built["npy"] / "train", "noise", 0).urls[0]
    sample = next(iter(wds.WebDataset(url, shardshuffle=False, empty_check=False).decode()))
    _, members = next(iter_tar_samples(Path(url)))
    assert sample["lq.npy"].dtype == np.uint8
    assert np.array_equal(sample["lq.npy"], decode_member(members["lq.npy"], "npy", "lq"))


def test_an_npy_member_decodes_its_first_rows_as_a_view_of_its_bytes() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, pixels)
    data = buffer.getvalue()
    assert member_size(data, "npy", "m") == (30, 20)
    assert np.array_equal(decode_member(data, "npy", "m", rows=7), pixels[:7])
    assert np.array_equal(decode_member(data, "npy", "m", rows=10**6), pixels)


class _Planted:
    """Unpickling this writes a file: proof that a member was (or was not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _shard_with(tmp_path: Path, lq: bytes) -> str:
    good = _npy(np.zeros((32, 32, 3), np.uint8))
    path = tmp_path / "bad-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("s0.gt.npy", good), ("s0.json", b"{}"), ("s0.lq.npy", lq)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize(
    "lq, why",
    [
        ("pickle", "holds object pixels"),
        (np.zeros((32, 32, 3), np.float32), "holds float32 pixels"),
        (np.zeros((32, 32), np.uint8), "of shape (32, 32)"),
        ("truncated", "bytes of pixels where its header says (32, 32, 3)"),
        ("text", "not a NumPy .npy array"),
    ],
)
def test_a_bad_npy_member_is_refused_by_name_and_never_unpickled(tmp_path, lq, why) -> None:
    planted = tmp_path / "planted.txt"
    if isinstance(lq, np.ndarray):
        data = _npy(lq)
    elif lq == "pickle":
        data = _npy(np.array([_Planted(planted)], dtype=object))
        pickle.loads(pickle.dumps(_Planted(tmp_path / "control.txt")))
        assert (tmp_path / "control.txt").exists()  # the planted payload runs if unpickled
    elif lq == "truncated":
        data = _npy(np.zeros((32, 32, 3), np.uint8))[:-5]
    else:
        data = b"not an array at all"
    url = _shard_with(tmp_path, data)
    read = {"url": url, "task_id": 0, "samples": 1, "limit": 1, "seed": 0, "crops": 1}
    with pytest.raises(ImageReadError, match=r"bad-000000\.tar:s0\.lq\.npy") as raised:
        list(read_crops(read | {"turns": False}, 16))
    assert why in str(raised.value)
    _, members = next(iter_tar_samples(Path(url)))
    with pytest.raises(ImageReadError, match=r"s0\.lq\.npy"):
        decode_pair_float(members, f"{url}:s0")
    assert not planted.exists()


def test_a_sample_without_a_pair_names_its_members(tmp_path) -> None:
    with pytest.raises(ImageReadError, match=r"x:s0: holds no LQ/GT pair.*\['gt.npy', 'lq.png'\]"):
        decode_pair_float({"lq.png": b"", "gt.npy": b""}, "x:s0")


def test_a_task_names_an_unknown_member_format(tmp_path) -> None:
    task = tmp_path / "noise.yaml"
    task.write_text(
        "name: noise\nkind: synthetic\ndegrade:\n  - {op: gaussian_noise}\ntrain: {members: jpg}\n"
    )
    with pytest.raises(ConfigError, match=r"train\.members"):
        load_task(task)
