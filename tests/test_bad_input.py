"""Real buckets hold junk: each kind of bad or odd input is used correctly or skipped with its reason."""
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from job import data
from tests.conftest import run_job, tiny_vgg16_settings, write_class_images


def save(path, mode="RGB", size=(40, 30), fmt=None, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(str(path))).integers(0, 255, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(path, fmt, **options)
    return path


def huge_png_header(path, width, height):
    """A valid PNG whose header claims width x height (what a decompression bomb looks like)."""
    save(path, "L", (4, 4))
    raw = bytearray(path.read_bytes())
    ihdr = raw[12:29]  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(raw))


@pytest.fixture
def junk_tree(tmp_path):
    """Two classes of good images plus every kind of odd file a real bucket has."""
    root = write_class_images(tmp_path / "bucket", ["cats", "dogs"], per_class=8)
    cats, dogs = root / "cats", root / "dogs"
    (cats / "zero.jpg").write_bytes(b"")
    good_jpeg = save(cats / "whole.jpg", fmt="JPEG").read_bytes()
    (cats / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 3])
    save(cats / "alpha.png", "RGBA")
    sixteen = Image.fromarray((np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50))
    sixteen.save(cats / "sixteen-bit.png")
    save(cats / "cmyk.jpg", "CMYK", fmt="JPEG")
    save(dogs / "anim.gif", "P")
    save(dogs / "old.bmp")
    save(dogs / "modern.webp", fmt="WEBP")
    Image.new("L", (10000, 10000), 90).save(dogs / "huge scan.jpg", quality=50)
    huge_png_header(dogs / "bomb.png", 20000, 20000)
    save(dogs / "chien épagneul №1.png")
    (dogs / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    save(dogs / "2024" / "march" / "nested.png")
    (dogs / "readme.txt").write_text("photos from the shelter")
    return root


def test_every_odd_file_is_used_or_skipped_with_its_reason(junk_tree):
    dataset = data.load_dataset(junk_tree, 32, 0.0, 0.0, seed=0)
    assert dataset.skipped.keys() == {"cats/zero.jpg", "cats/truncated.jpg", "dogs/bomb.png",
                                      "dogs/.DS_Store", "dogs/readme.txt"}
    assert dataset.skipped["cats/zero.jpg"] == "empty file (0 bytes)"
    assert dataset.skipped["cats/truncated.jpg"].startswith("unreadable image")
    assert dataset.skipped["dogs/bomb.png"] == \
        "too large: 20000x20000 pixels (limit 150,000,000)"
    assert dataset.skipped["dogs/.DS_Store"] == "hidden file"
    assert dataset.skipped["dogs/readme.txt"] == "not an image (unknown format)"
    used = {path.split("bucket/")[1] for path in dataset.train.paths}
    assert {"cats/whole.jpg", "cats/alpha.png", "cats/sixteen-bit.png", "cats/cmyk.jpg",
            "dogs/anim.gif", "dogs/old.bmp", "dogs/modern.webp", "dogs/huge scan.jpg",
            "dogs/chien épagneul №1.png", "dogs/2024/march/nested.png"} <= used
    assert dataset.counts()["train"] == {"cats": 12, "dogs": 14}


def test_a_class_folder_that_is_a_symlink_is_followed(tmp_path):
    write_class_images(tmp_path / "elsewhere", ["birds"], per_class=3)
    write_class_images(tmp_path / "bucket", ["ants"], per_class=3)
    (tmp_path / "bucket" / "birds").symlink_to(tmp_path / "elsewhere" / "birds")
    dataset = data.load_dataset(tmp_path / "bucket", 32, 0.0, 0.0, seed=0)
    assert dataset.counts()["train"] == {"ants": 3, "birds": 3}


def test_a_symbolic_link_to_nothing_is_skipped_with_its_reason(tmp_path):
    write_class_images(tmp_path / "bucket", ["ants", "bees"], per_class=3)
    (tmp_path / "bucket" / "ants" / "moved.png").symlink_to(tmp_path / "gone.png")
    dataset = data.load_dataset(tmp_path / "bucket", 32, 0.0, 0.0, seed=0)
    assert dataset.skipped == {"ants/moved.png": "broken symbolic link"}
    assert dataset.counts()["train"] == {"ants": 3, "bees": 3}


def test_an_empty_split_folder_is_ignored_and_the_split_made_from_train(tmp_path):
    write_class_images(tmp_path / "train", ["a", "b"], per_class=10)
    (tmp_path / "validation" / "a").mkdir(parents=True)
    dataset = data.load_dataset(tmp_path, 32, 0.2, 0.0, seed=0)
    assert len(dataset.validation) == 4
    assert "validation/ holds no class folders with files; ignored" in dataset.notes


def test_the_job_records_skipped_files_and_finishes_without_a_traceback(junk_tree, tmp_path):
    result = run_job(tiny_vgg16_settings(junk_tree, tmp_path / "out", tmp_path / "cache",
                                         HEAD_EPOCHS="1", FINE_TUNE_EPOCHS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "skipped cats/truncated.jpg: unreadable image" in result.stderr
    metrics = json.loads((tmp_path / "out" / "tiny" / "metrics.json").read_text())
    assert len(metrics["skipped_files"]) == 5 and metrics["skipped_files"]["dogs/.DS_Store"] == "hidden file"


def test_data_uri_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"x")
    result = run_job(tiny_vgg16_settings(tmp_path / "photo.jpg", tmp_path / "out", tmp_path / "cache"),
                     timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR job: " in line]
    assert len(errors) == 1 and "photo.jpg: is not a directory of class folders" in errors[0]
