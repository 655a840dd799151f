"""Finding, checking and splitting labelled images, and the tf.data pipeline that feeds them."""
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from edge.images import DecodeBudget, ImageError, load_image
from job.inputs import data
from job.inputs.shard import Shard
from tests.conftest import write_class_images


def load(root, **kwargs):
    settings = dict(image_size=32, validation_split=0.2, test_split=0.1, seed=1)
    return data.load_dataset(root, **{**settings, **kwargs})


def test_classes_are_the_sorted_folder_names(tmp_path):
    write_class_images(tmp_path, ["zebra", "ant", "moth"], per_class=5)
    assert load(tmp_path).class_names == ["ant", "moth", "zebra"]


@pytest.mark.parametrize("name", ["bad\nname", "bad\rname", "bad\tname", "bad\u2028name", "bad\x85name"])
def test_a_class_folder_whose_name_is_not_one_printable_line_is_refused_naming_it(tmp_path, name):
    write_class_images(tmp_path, ["good", name], per_class=5)
    with pytest.raises(data.DataError, match=f"the class folder {re.escape(repr(name))} has a "
                                             "control character or line break"):
        load(tmp_path)


def test_split_folders_are_used_as_they_are(tmp_path):
    for split, count in (("train", 6), ("validation", 3), ("test", 2)):
        write_class_images(tmp_path / split, ["a", "b"], per_class=count, seed=count)
    dataset = load(tmp_path)
    assert dataset.counts() == {"train": {"a": 6, "b": 6}, "validation": {"a": 3, "b": 3},
                                "test": {"a": 2, "b": 2}}
    assert all("/validation/" in path for path in dataset.validation.paths)


def test_without_split_folders_the_split_is_stratified_and_seeded(tmp_path):
    write_class_images(tmp_path, ["a", "b"], per_class=20)
    first, again, other_seed = load(tmp_path), load(tmp_path), load(tmp_path, seed=2)
    assert first.counts() == {"train": {"a": 14, "b": 14}, "validation": {"a": 4, "b": 4},
                              "test": {"a": 2, "b": 2}}
    assert first.validation.paths == again.validation.paths
    assert first.validation.paths != other_seed.validation.paths
    assert not set(first.train.paths) & set(first.validation.paths) | set(first.test.paths) & set(first.train.paths)


def test_only_a_train_folder_splits_validation_and_test_from_it(tmp_path):
    write_class_images(tmp_path / "train", ["a", "b"], per_class=10)
    dataset = load(tmp_path)
    assert len(dataset.validation) == 4 and len(dataset.test) == 2
    assert any("validation: 20%" in note for note in dataset.notes)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_any_image_mode_decodes_to_rgb(tmp_path, mode):
    pixels = np.linspace(0, 255, 40 * 30 * 3).reshape(30, 40, 3).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = image.convert(mode)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path)
    array = load_image(str(path), 16)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8
    assert array.max() > 100  # 16-bit values are scaled into 0-255, not clipped to white or black


def test_grayscale_originals_of_any_size_are_used(xray_originals_dir):
    dataset = load(xray_originals_dir, image_size=64)
    assert dataset.skipped == {}
    assert len(dataset.train) == 63 and len(dataset.test) == 17


def test_corrupt_and_non_image_files_are_skipped_and_named(tmp_path):
    write_class_images(tmp_path, ["a", "b"], per_class=6)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    good = (tmp_path / "b" / "b_0.png").read_bytes()
    (tmp_path / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    dataset = load(tmp_path)
    assert dataset.skipped == {
        "a/notes.txt": "not an image (unknown format)",
        "b/empty.jpg": "empty file (0 bytes)",
        "b/truncated.png": dataset.skipped["b/truncated.png"],
    }
    assert dataset.skipped["b/truncated.png"].startswith("unreadable image")
    assert len(dataset.train) + len(dataset.validation) + len(dataset.test) == 12


def test_a_class_with_no_usable_image_is_an_error(tmp_path):
    write_class_images(tmp_path, ["a"], per_class=4)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.jpg").write_text("junk")
    with pytest.raises(data.DataError, match="class 'b' has no usable image: 1 file skipped "
                       r"\(1 not an image \(unknown format\)\), e\.g\. b/broken\.jpg$"):
        load(tmp_path)


def test_the_error_for_a_class_with_no_usable_image_says_why_its_files_were_skipped(tmp_path):
    write_class_images(tmp_path, ["dogs"], per_class=4)
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.txt").write_text("not an image")
    (tmp_path / "cats" / "b.txt").write_text("nor this")
    (tmp_path / "cats" / "c.jpg").write_bytes(b"")
    with pytest.raises(data.DataError) as error:
        load(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / 'cats'}: class 'cats' has no usable image: 3 files skipped "
        "(2 not an image (unknown format), 1 empty file (0 bytes)), e.g. cats/a.txt")


def test_a_grayscale_image_decodes_to_the_same_pixels_resized_before_or_after_conversion(tmp_path):
    """load_image resizes grayscale before making it RGB, to keep memory small; same pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (301, 457), np.uint8)
    Image.fromarray(pixels, "L").save(tmp_path / "gray.png")
    for size in (16, 150, 600):
        converted_first = Image.fromarray(pixels, "L").convert("RGB").resize(
            (size, size), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(load_image(str(tmp_path / "gray.png"), size),
                                      np.asarray(converted_first))


def test_decodes_share_a_memory_budget_and_one_larger_than_it_runs_alone():
    budget, running, overlaps, lock = DecodeBudget(100), [], [], threading.Lock()

    def decode(size):
        with budget.reserve(size):
            with lock:
                running.append(size)
                overlaps.append(list(running))
            time.sleep(0.05)
            with lock:
                running.remove(size)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(decode, [30] * 12 + [500] + [30] * 12))
    assert max(sum(sizes) for sizes in overlaps if 500 not in sizes) <= 100
    assert [sizes for sizes in overlaps if 500 in sizes] == [[500]]
    assert max(len(sizes) for sizes in overlaps) == 3  # as many as fit do run together


def test_fewer_than_two_classes_is_an_error(tmp_path):
    write_class_images(tmp_path, ["only"], per_class=4)
    with pytest.raises(data.DataError, match="found 1 class folder"):
        load(tmp_path)


def test_a_file_instead_of_a_folder_is_an_error(tmp_path):
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(data.DataError, match="is not a directory"):
        load(tmp_path / "file.jpg")


def test_unreadable_file_raises_image_error_with_reason(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ImageError, match="unreadable image|not an image"):
        load_image(str(tmp_path / "x.png"), 8)


def test_pipeline_yields_float_batches_of_the_decoded_images(tmp_path):
    write_class_images(tmp_path, ["a", "b"], per_class=5)
    dataset = load(tmp_path, validation_split=0.0, test_split=0.0)
    batches = list(data.image_dataset(dataset.train, 32, batch_size=4,
                                      cache_file=str(tmp_path / "cache")))
    images = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.float32
    assert labels.tolist() == dataset.train.labels
    np.testing.assert_array_equal(images[0], load_image(dataset.train.paths[0], 32))
    assert (tmp_path / "cache").exists()


def test_class_weights_balance_the_classes():
    split = data.Split(["x"] * 4, [0, 0, 0, 1])
    assert data.class_weights(split.label_counts(2)) == {0: pytest.approx(4 / 6),
                                                        1: pytest.approx(2.0)}


def test_a_shard_loads_its_part_of_every_class_folder(tmp_path):
    root = write_class_images(tmp_path / "images", ["a", "b"], per_class=9)
    whole = data.load_dataset(root, 16, 0.25, 0.25, seed=3)
    parts = [data.load_dataset(root, 16, 0.25, 0.25, seed=3, shard=Shard(index, 2),
                               require_every_class=False) for index in range(2)]
    every = lambda dataset: {p for name in data.SPLITS for p in getattr(dataset, name).paths}
    assert every(parts[0]) | every(parts[1]) == every(whole)
    assert not every(parts[0]) & every(parts[1])
    assert [len(every(part)) for part in parts] in ([9, 9], [10, 8], [8, 10])


def test_the_splits_of_a_sharded_run_are_found_again_as_each_worker_made_them(tmp_path):
    root = write_class_images(tmp_path / "images", ["a", "b"], per_class=12)
    parts = [data.load_dataset(root, 16, 0.25, 0.25, seed=3, shard=Shard(index, 3),
                               require_every_class=False) for index in range(3)]
    again = data.load_as_split_by(3, root, 16, 0.25, 0.25, seed=3)
    for name in data.SPLITS:
        assert sorted(getattr(again, name).paths) == sorted(
            path for part in parts for path in getattr(part, name).paths)
    assert again.class_names == ["a", "b"]
