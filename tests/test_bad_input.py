"""Real buckets hold junk: each kind of bad or odd input is used correctly or skipped with its reason."""
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from job.inputs import data
from tests.conftest import (ROOT, job_environment, run_in_process, run_job, tiny_vgg16_settings,
                            write_class_images)


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


def real_folders(dataset, split):
    """Each image of a split as (its class, the name of the folder its real file is in)."""
    split = getattr(dataset, split)
    return [(dataset.class_names[label], Path(path).resolve().parent.name)
            for path, label in zip(split.paths, split.labels)]


@pytest.mark.timeout(60)  # following `self -> .` again and again made the walk exponential: a hang
def test_symbolic_link_loops_are_skipped_and_every_image_is_counted_once(tmp_path):
    root = write_class_images(tmp_path / "bucket", ["NORMAL", "PNEUMONIA"], per_class=10)
    (root / "NORMAL" / "up").symlink_to("..")
    (root / "NORMAL" / "self").symlink_to(".")
    dataset = data.load_dataset(root, 32, 0.2, 0.1, seed=0)
    assert dataset.skipped == {"NORMAL/up": "symbolic link loop: points to an ancestor folder",
                               "NORMAL/self": "symbolic link loop: points to an ancestor folder"}
    assert dataset.counts() == {"train": {"NORMAL": 7, "PNEUMONIA": 7},
                                "validation": {"NORMAL": 2, "PNEUMONIA": 2},
                                "test": {"NORMAL": 1, "PNEUMONIA": 1}}
    labelled = [pair for split in data.SPLITS for pair in real_folders(dataset, split)]
    assert all(label == folder for label, folder in labelled)
    files = [Path(path).resolve()
             for split in data.SPLITS for path in getattr(dataset, split).paths]
    assert len(set(files)) == len(files) == 20


@pytest.mark.parametrize("link", [os.symlink, os.link], ids=["symbolic link", "hard link"])
def test_a_file_linked_into_two_splits_is_counted_once(tmp_path, link):
    for split in ("train", "test"):
        write_class_images(tmp_path / split, ["a", "b"], per_class=3, seed=len(split))
    link(tmp_path / "train" / "a" / "a_0.png", tmp_path / "test" / "a" / "copy.png")
    dataset = data.load_dataset(tmp_path, 32, 0.0, 0.0, seed=0)
    assert dataset.skipped == {"test/a/copy.png": "same file as train/a/a_0.png"}
    assert dataset.counts()["train"] == {"a": 3, "b": 3}
    assert dataset.counts()["test"] == {"a": 3, "b": 3}


def test_a_link_into_another_class_folder_is_skipped_with_its_reason(tmp_path):
    root = write_class_images(tmp_path / "bucket", ["cats", "dogs"], per_class=3)
    (root / "cats" / "more").symlink_to("../dogs")
    (root / "cats" / "puppy.png").symlink_to("../dogs/dogs_0.png")
    dataset = data.load_dataset(root, 32, 0.0, 0.0, seed=0)
    assert dataset.skipped == {"cats/more": "symbolic link into another class folder: dogs",
                               "cats/puppy.png": "symbolic link into another class folder: dogs"}
    assert dataset.counts()["train"] == {"cats": 3, "dogs": 3}
    assert all(label == folder for label, folder in real_folders(dataset, "train"))


def test_a_folder_outside_the_data_root_is_followed_once_however_often_it_is_linked(tmp_path):
    write_class_images(tmp_path / "elsewhere", ["extra"], per_class=2)
    root = write_class_images(tmp_path / "bucket", ["cats", "dogs"], per_class=3)
    (root / "cats" / "extra").symlink_to(tmp_path / "elsewhere" / "extra")
    (root / "cats" / "more").symlink_to(tmp_path / "elsewhere" / "extra")
    dataset = data.load_dataset(root, 32, 0.0, 0.0, seed=0)
    assert dataset.skipped == {"cats/more": "same folder as cats/extra"}
    assert dataset.counts()["train"] == {"cats": 5, "dogs": 3}


HUGE_DECODES_CHILD = """
import json, sys
from job.inputs import data
dataset = data.load_dataset(sys.argv[1], 32, 0.0, 0.0, seed=0)
decoded = sum(len(images) for images, _ in data.image_dataset(dataset.train, 32, batch_size=4))
status = open("/proc/self/status").read().split()
print(json.dumps({"counts": dataset.counts()["train"], "skipped": dataset.skipped,
                  "decoded": decoded, "peak_kb": int(status[status.index("VmHWM:") + 1])}))
"""


@pytest.mark.slow  # a process that imports TensorFlow and decodes 1.2 gigapixels
def test_small_files_that_decode_huge_are_used_in_bounded_memory(tmp_path):
    """Eight 140 KB PNGs of 12000x12000 pixels (144 MB each decoded) took the job to 7.5 GB."""
    root = write_class_images(tmp_path / "bucket", ["cats", "dogs"], per_class=4)
    Image.new("L", (12000, 12000), 90).save(root / "cats" / "huge_0.png")
    for number in range(1, 8):  # copies: distinct files, written in no time
        folder = root / ("cats", "dogs")[number % 2]
        shutil.copyfile(root / "cats" / "huge_0.png", folder / f"huge_{number}.png")
    # The peak is the child's own (VmHWM): ru_maxrss of RUSAGE_CHILDREN starts from the RSS of
    # this pytest process at the fork, so it would measure the tests run before this one.
    result = subprocess.run([sys.executable, "-c", HUGE_DECODES_CHILD, str(root)], cwd=ROOT,
                            env=job_environment({}), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["skipped"] == {}  # 144 megapixels is under MAX_PIXELS: a real scan, so used
    assert report["counts"] == {"cats": 8, "dogs": 8} and report["decoded"] == 16
    assert report["peak_kb"] < 2 * 1024**2, f"peak RSS {report['peak_kb'] / 1024**2:.1f} GB"


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
    # TF_CPP_MIN_LOG_LEVEL=0: TensorFlow's own warnings reach stderr, as a user who asks sees them
    result = run_job(tiny_vgg16_settings(junk_tree, tmp_path / "out", tmp_path / "cache",
                                         HEAD_EPOCHS="1", FINE_TUNE_EPOCHS="1",
                                         TF_CPP_MIN_LOG_LEVEL="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # the decoded images' cache is filled to its end, without tf.data's warning that it was not
    assert "did not fully read the dataset being cached" not in result.stderr
    assert "skipped cats/truncated.jpg: unreadable image" in result.stderr
    metrics = json.loads((tmp_path / "out" / "tiny" / "metrics.json").read_text())
    assert len(metrics["skipped_files"]) == 5 and metrics["skipped_files"]["dogs/.DS_Store"] == "hidden file"


def test_data_uri_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"x")
    result = run_in_process("job", tiny_vgg16_settings(tmp_path / "photo.jpg", tmp_path / "out",
                                                       tmp_path / "cache"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR job: " in line]
    assert len(errors) == 1 and "photo.jpg: is not a directory of class folders" in errors[0]
