"""The shard builder on real images: layout, manifests, pairs, odd inputs, resume, read-back."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from allinone.config import load_task
from allinone.data.images import ImageReadError, decode_image_bytes, read_image
from allinone.data.shards import (
    BuildRequest,
    ShardError,
    build_shards,
    iter_tar_samples,
    read_manifest,
    shard_urls,
    verify_shards,
)
from allinone.evaluate.metrics import psnr
from conftest import CLEAN_PHOTOS, REPO, TEST_SETS

PHOTOS = sorted(CLEAN_PHOTOS.glob("*.jpg"))[:3]


def synthetic_task(tmp_path: Path, crop: int = 48, variants: int = 2) -> Path:
    path = tmp_path / "noise.yaml"
    path.write_text(
        "name: noise\nkind: synthetic\n"
        "degrade:\n  - {op: gaussian_noise, sigma: [15, 50]}\n  - {op: jpeg, quality: [40, 90]}\n"
        f"train: {{variants: {variants}, crop: {crop}}}\n"
    )
    return path


def photo_folder(tmp_path: Path, photos=PHOTOS) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    return folder


def build(tmp_path: Path, source: Path, out: str = "out", task: Path | None = None, **kw):
    request = BuildRequest(
        load_task(task or synthetic_task(tmp_path)),
        kw.pop("split", "train"),
        str(source),
        tmp_path / out,
        kw.pop("samples_per_shard", 2),
        kw.pop("seed", 0),
        kw.pop("skip_bad", False),
        **({"max_pixels": kw.pop("max_pixels")} if "max_pixels" in kw else {}),
    )
    return request, build_shards(request, workers=kw.pop("workers", 1))


def test_layout_members_and_manifest(tmp_path: Path) -> None:
    request, manifest = build(tmp_path, photo_folder(tmp_path))
    names = sorted(p.name for p in request.out.glob("*.tar"))
    assert names == [f"noise-train-{i:06d}.tar" for i in range(3)]  # 3 photos x 2 variants / 2
    assert manifest["complete"] and manifest["samples"] == 6
    assert manifest["source_files"] == sorted(str(request.source + "/" + p.name) for p in PHOTOS)
    for shard in names:
        with tarfile.open(request.out / shard) as tar:
            members = tar.getnames()
        assert members == sorted(members), "members must be sorted by key"
        for _key, sample in iter_tar_samples(request.out / shard):
            assert set(sample) == {"lq.png", "gt.png", "json"}
            meta = json.loads(sample["json"])
            assert meta["task"] == "noise" and meta["split"] == "train"
            assert [p["op"] for p in meta["params"]] == ["gaussian_noise", "jpeg"]
            assert 15 <= meta["params"][0]["sigma"] <= 50
            lq, gt = decode_image_bytes(sample["lq.png"]), decode_image_bytes(sample["gt.png"])
            assert lq.shape == gt.shape == (48, 48, 3)
            assert psnr(lq, gt) < 35  # degraded for real
    report = verify_shards(request.out)
    assert report.problems == [] and report.samples == 6


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    source = photo_folder(tmp_path)
    _, first = build(tmp_path, source, "a")
    _, again = build(tmp_path, source, "b")
    _, other = build(tmp_path, source, "c", seed=1)
    hashes = lambda m: [s["sha256"] for s in m["shards"]]  # noqa: E731
    assert hashes(first) == hashes(again)
    assert hashes(first) != hashes(other)


def test_two_workers_write_the_same_shards(tmp_path: Path) -> None:
    source = photo_folder(tmp_path)
    _, serial = build(tmp_path, source, "serial")
    _, parallel = build(tmp_path, source, "parallel", workers=2)
    assert [s["sha256"] for s in serial["shards"]] == [s["sha256"] for s in parallel["shards"]]


def test_resume_keeps_good_shards_and_rebuilds_the_rest(tmp_path: Path) -> None:
    request, manifest = build(tmp_path, photo_folder(tmp_path))
    shards = sorted(request.out.glob("*.tar"))
    kept_mtime = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    shards[2].write_bytes(shards[2].read_bytes()[:1000])  # truncated, as by a crash
    _, resumed = build(tmp_path, Path(request.source))
    assert shards[0].stat().st_mtime_ns == kept_mtime, "a good shard must not be rewritten"
    assert resumed["shards"] == manifest["shards"]
    assert verify_shards(request.out).problems == []


def test_failed_build_leaves_no_shard_that_looks_whole(tmp_path: Path) -> None:
    source = photo_folder(tmp_path)
    (source / "zz_truncated.jpg").write_bytes(PHOTOS[0].read_bytes()[:2000])
    with pytest.raises(ShardError, match="zz_truncated.jpg"):
        build(tmp_path, source)
    out = tmp_path / "out"
    assert not list(out.glob("*.part")) and not list(out.glob(".*"))
    manifest = read_manifest(out, "noise", "train")
    assert manifest is not None and manifest["complete"] is False
    assert verify_shards(out).problems, "verify must flag an incomplete build"
    with pytest.raises(ShardError, match="incomplete"):
        shard_urls(out, "noise", "train")
    # --skip-bad records the file and finishes
    _, manifest = build(tmp_path, source, skip_bad=True)
    assert manifest["complete"] and manifest["samples"] == 6
    assert [s["file"] for s in manifest["skipped"]] == [str(source / "zz_truncated.jpg")]


def odd_inputs(folder: Path) -> dict[str, str]:
    """Real photos saved the ways real datasets store them; returns name -> expected conversion."""
    photo = Image.open(PHOTOS[0]).convert("RGB").resize((96, 72))
    folder.mkdir()
    shutil.copy(TEST_SETS / "Set12" / "01.png", folder / "grey.png")
    rgba = photo.copy()
    rgba.putalpha(200)
    rgba.save(folder / "rgba.png")
    sixteen = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    photo.save(folder / "rotated.jpg", exif=exif.tobytes())
    photo.resize((20, 30)).save(folder / "small.png")
    return {
        "grey.png": "grey->rgb",
        "rgba.png": "rgba->rgb",
        "sixteen.png": "16bit->float",
        "rotated.jpg": "exif-rotated",
        "small.png": "smaller than crop",
    }


def test_odd_inputs_are_converted_and_recorded(tmp_path: Path) -> None:
    expected = odd_inputs(tmp_path / "odd")
    request, manifest = build(
        tmp_path, tmp_path / "odd", task=synthetic_task(tmp_path, crop=48, variants=1)
    )
    for name, conversion in expected.items():
        recorded = manifest["conversions"][str(tmp_path / "odd" / name)]
        assert any(conversion in c for c in recorded), (name, recorded)
    assert read_image(tmp_path / "odd" / "rotated.jpg").pixels.shape[:2] == (
        96,
        72,
    )  # turned upright
    assert verify_shards(request.out).problems == []


@pytest.mark.parametrize("layout,folder", [("rain100l", "Rain100L"), ("sots", "SOTS")])
def test_real_pairs_stay_paired(tmp_path: Path, layout: str, folder: str) -> None:
    task = REPO / "tasks" / f"{layout}.yaml"
    request, manifest = build(
        tmp_path, TEST_SETS / folder, task=task, split="test", samples_per_shard=4
    )
    pairs = []
    for url in shard_urls(request.out, layout, "test"):
        for _key, sample in iter_tar_samples(Path(url)):
            meta = json.loads(sample["json"])
            lq_file, gt_file = Path(meta["lq_source"]), Path(meta["source"])
            if layout == "rain100l":
                assert gt_file.name == "no" + lq_file.name
            else:
                assert gt_file.stem == lq_file.stem.split("_")[0]
                assert meta["params"]["airlight"] == float(lq_file.stem.split("_")[1])
            gt_pixels = read_image(gt_file).pixels
            stored_gt = decode_image_bytes(sample["gt.png"])
            assert np.abs(stored_gt - gt_pixels).max() <= 1 / 255 + 1e-6  # the GT, unchanged
            pairs.append((decode_image_bytes(sample["lq.png"]), stored_gt))
    assert len(pairs) == manifest["samples"] == len(list((TEST_SETS / folder).glob("*/*"))) // 2
    # Each LQ is far closer to its own GT than to any other pair's (compared on a common crop).
    h, w = (min(image.shape[i] for pair in pairs for image in pair) for i in (0, 1))
    crops = [(lq[:h, :w], gt[:h, :w]) for lq, gt in pairs]
    for i, (lq, gt) in enumerate(crops):
        others = [psnr(lq, other) for j, (_, other) in enumerate(crops) if j != i]
        assert psnr(lq, gt) > max(others) + 3, (i, psnr(lq, gt), max(others))


def test_pair_problems_are_named(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    (root / "lq").mkdir(parents=True)
    (root / "gt").mkdir()
    clear = Image.open(TEST_SETS / "SOTS" / "clear" / "0001.png")
    hazy = Image.open(TEST_SETS / "SOTS" / "hazy" / "0001_0.8_0.2.jpg")
    clear.save(root / "gt" / "a.png")
    hazy.save(root / "lq" / "a.png")
    clear.save(root / "gt" / "b.png")
    hazy.crop((0, 0, 546, 410)).save(root / "lq" / "b.png")  # a few border pixels off
    hazy.save(root / "lq" / "c.png")  # no ground truth
    clear.save(root / "gt" / "d.png")
    hazy.resize((200, 150)).save(root / "lq" / "d.png")  # a different picture size
    task = REPO / "tasks" / "pairs.yaml"
    with pytest.raises(ShardError, match="c.png"):
        build(tmp_path, root, task=task, split="test")
    _, manifest = build(tmp_path, root, "o2", task=task, split="test", skip_bad=True)
    skipped = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"c.png", "d.png"}
    assert "does not match" in skipped["d.png"]
    assert any("common size" in c for c in manifest["conversions"][str(root / "gt" / "b.png")])
    assert manifest["samples"] == 2


def test_reads_back_with_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    request, _ = build(tmp_path, photo_folder(tmp_path))
    urls = shard_urls(request.out, "noise", "train")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == 6
    assert all(s["lq.png"].shape == s["gt.png"].shape == (48, 48, 3) for s in samples)
    assert all(s["json"]["task"] == "noise" for s in samples)


def test_reads_back_with_ray_data(tmp_path: Path, ray_session) -> None:
    import ray.data

    request, _ = build(tmp_path, photo_folder(tmp_path))
    urls = shard_urls(request.out, "noise", "train")
    rows = ray.data.read_webdataset(urls).take_all()
    assert len(rows) == 6
    assert {r["lq.png"].shape for r in rows} == {(48, 48, 3)}
    assert all(r["json"]["task"] == "noise" for r in rows)


def test_cli_build_and_verify(tmp_path: Path) -> None:
    import subprocess
    import sys

    source = photo_folder(tmp_path)
    out = tmp_path / "cli"
    command = [
        sys.executable,
        "-m",
        "allinone",
        "shards",
        "build",
        str(synthetic_task(tmp_path)),
        "--source",
        str(source),
        "--out",
        str(out),
        "--samples-per-shard",
        "2",
        "--workers",
        "2",
    ]
    built = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    assert "6 samples in 3 shards" in built.stdout and "samples/s" in built.stdout
    verify = [sys.executable, "-m", "allinone", "shards", "verify", str(out)]
    assert subprocess.run(verify, capture_output=True, timeout=60).returncode == 0
    shard = out / "noise-train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    checked = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 1 and "noise-train-000001.tar" in checked.stderr


def test_files_are_world_readable(tmp_path: Path) -> None:
    request, _ = build(tmp_path, photo_folder(tmp_path))
    assert all(os.stat(p).st_mode & 0o044 for p in request.out.iterdir())


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


KILL_MID_SHARD = """
import os, signal, sys
from pathlib import Path
from allinone.config import load_task
from allinone.data.shards import BuildRequest, encode_samples, plan_samples, write_shard

task, source, out = sys.argv[1:4]
request = BuildRequest(load_task(Path(task)), "train", source, Path(out), 2)
specs = plan_samples(request)[0][2:4]

def killed_after_one_sample():
    samples = encode_samples(request, specs)
    yield next(samples)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or `kill -9` would

write_shard(request, 1, specs, killed_after_one_sample())
"""


def test_temp_files_of_a_killed_build_are_flagged_then_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    request, _ = build(tmp_path, photo_folder(tmp_path))
    task = tmp_path / "noise.yaml"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_MID_SHARD, str(task), request.source, str(request.out)],
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    left = list(request.out.glob(".noise-train-000001.tar.*.part"))
    assert len(left) == 1, "the kill must have left a half-written shard"
    problems = verify_shards(request.out).problems
    assert any(str(left[0]) in p and "temporary" in p for p in problems), problems
    build(tmp_path, Path(request.source))  # resume
    assert not list(request.out.glob(".*.part"))
    assert verify_shards(request.out).problems == []


def test_a_refused_file_is_skipped_once(tmp_path: Path) -> None:
    source = photo_folder(tmp_path)
    bad = source / "zz_truncated.jpg"
    bad.write_bytes(PHOTOS[0].read_bytes()[:2000])
    # one sample per shard: the bad file's two variants are refused in two shards
    request, manifest = build(tmp_path, source, samples_per_shard=1, skip_bad=True)
    assert [s["file"] for s in manifest["skipped"]] == [str(bad)]
    for shard in sorted(request.out.glob("*.tar"))[-2:]:
        shard.unlink()  # the bad file's two (empty) shards: its key sorts last
    _, resumed = build(tmp_path, source, samples_per_shard=1, skip_bad=True)
    assert resumed["samples"] == 6
    assert [s["file"] for s in resumed["skipped"]] == [str(bad)]


def test_crop_note_says_which_side_was_kept(tmp_path: Path) -> None:
    folder = tmp_path / "wide"
    folder.mkdir()
    Image.open(PHOTOS[0]).convert("RGB").resize((96, 30)).save(folder / "wide.png")
    request, manifest = build(tmp_path, folder, task=synthetic_task(tmp_path, variants=1))
    (note,) = [c for c in manifest["conversions"][str(folder / "wide.png")] if "crop" in c]
    assert note == "96x30: height smaller than crop 48, kept whole; width cropped to 48"
    (url,) = shard_urls(request.out, "noise", "train")
    (_, sample), *_ = iter_tar_samples(Path(url))
    assert decode_image_bytes(sample["gt.png"]).shape == (30, 48, 3)


def bomb_png(path: Path, width: int = 14000, height: int = 13000) -> Path:
    """A grey PNG of ``width`` x ``height`` zeros, written row by row: a few hundred KB on disk
    that would decode to gigabytes (made in bounded memory, as an attacker would)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    packer, row, parts = zlib.compressobj(9), bytes(width + 1), []  # filter byte 0, then zeros
    parts += [packer.compress(row) for _ in range(height)]
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
    path.write_bytes(png + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_bad_input_refused_before_decoding(tmp_path: Path) -> None:
    source = photo_folder(tmp_path)
    bomb = bomb_png(source / "bomb.png")
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ShardError, match=r"bomb\.png: 14000x13000 is 182\.0 MP, over the limit"):
        build(tmp_path, source)
    _, manifest = build(tmp_path, source, "skipped", skip_bad=True)
    assert [Path(s["file"]).name for s in manifest["skipped"]] == ["bomb.png"]
    assert manifest["samples"] == 2 * len(PHOTOS)  # the batch went on
    with pytest.raises(ImageReadError, match="400.0 MP, over the limit of 300 MP"):
        read_image(bomb_png(tmp_path / "beyond-pil.png", 20000, 20000), max_pixels=300_000_000)


def test_the_pixel_limit_is_configurable_and_keeps_images_at_their_size(tmp_path: Path) -> None:
    folder = tmp_path / "large"
    folder.mkdir()
    Image.open(PHOTOS[0]).convert("RGB").resize((300, 200)).save(folder / "large.png")
    test_task = tmp_path / "whole.yaml"
    test_task.write_text("name: whole\nkind: synthetic\ndegrade: [{op: gaussian_noise}]\n")
    request, manifest = build(tmp_path, folder, task=test_task, split="test", max_pixels=60_000)
    (url,) = shard_urls(request.out, "whole", "test")
    (_, sample), *_ = iter_tar_samples(Path(url))
    assert decode_image_bytes(sample["gt.png"]).shape == (200, 300, 3)  # stored at its size
    with pytest.raises(ShardError, match=r"large\.png: 300x200 is 0\.1 MP, over the limit"):
        build(tmp_path, folder, "o2", task=test_task, split="test", max_pixels=59_999)


def test_transparency_is_flattened_onto_white(tmp_path: Path) -> None:
    black = Image.new("RGBA", (16, 16), (0, 0, 0, 128))  # black at 50% alpha
    black.save(tmp_path / "half.png")
    loaded = read_image(tmp_path / "half.png")
    np.testing.assert_allclose(loaded.pixels, 1 - 128 / 255, atol=1e-6)  # grey, not black
    assert loaded.conversions == ["rgba->rgb on white"] and loaded.alpha is None
    straight = read_image(tmp_path / "half.png", flatten=False)
    np.testing.assert_allclose(straight.pixels, 0.0)
    np.testing.assert_allclose(straight.alpha, 128 / 255, atol=1e-6)
    Image.new("LA", (16, 16), (200, 0)).save(tmp_path / "grey.png")  # fully transparent grey
    grey = read_image(tmp_path / "grey.png")
    assert grey.conversions == ["grey-alpha->rgb on white", "grey->rgb"]
    np.testing.assert_allclose(grey.pixels, 1.0)
    palette = Image.new("P", (16, 16), 0)
    palette.save(tmp_path / "opaque.png")
    palette.save(tmp_path / "clear.png", transparency=0)
    assert read_image(tmp_path / "opaque.png", flatten=False).alpha is None  # nothing to keep
    assert read_image(tmp_path / "clear.png", flatten=False).alpha.max() == 0.0


def test_a_pair_a_few_pixels_apart_is_centre_cropped_with_both_sizes_noted(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    (root / "lq").mkdir(parents=True)
    (root / "gt").mkdir()
    photo = Image.open(PHOTOS[0]).convert("RGB").resize((100, 80))
    photo.save(root / "gt" / "a.png")
    photo.crop((3, 2, 97, 78)).save(root / "lq" / "a.png")  # 3 and 2 border pixels cut off
    _, manifest = build(tmp_path, root, task=REPO / "tasks" / "pairs.yaml", split="test")
    notes = manifest["conversions"][str(root / "gt" / "a.png")]
    assert "pair centre-cropped to common size 94x76 (LQ 94x76, GT 100x80)" in notes
