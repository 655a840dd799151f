"""A run's identity (job/results/identity.py): what it holds, how two are compared, how a data listing is
digested (storage/listing.py), and a rerun checked against what a run recorded. In-process;
the end-to-end refusals of real runs are in tests/test_resume.py."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from job.config import Config, ConfigError
from job.results import identity
from storage import listing, objects
from tests.conftest import write_class_images
from tests.test_storage import upload_tree


def config_of(data, out, **settings) -> Config:
    return Config.from_env({"DATA_URI": str(data), "OUTPUT_URI": str(out), "RUN_ID": "run-1",
                            "CACHE_DIR": str(Path(data).parent / "cache"), **settings})


@pytest.fixture
def images(tmp_path):
    return write_class_images(tmp_path / "images", ["a", "b"], per_class=3, size=8)


def recorded_run(config: Config, complete: bool) -> dict:
    """Writes what a run of config leaves: a complete run's metrics.json, or checkpoints with
    their identity.json; returns that identity."""
    recorded = identity.of_attempt(config)
    folder = config.run_uri if complete else config.checkpoint_uri
    os.makedirs(folder, exist_ok=True)
    if complete:
        (Path(folder) / "metrics.json").write_text(json.dumps({identity.KEY: recorded}))
    else:
        (Path(folder) / identity.FILE).write_text(json.dumps(recorded))
    return recorded


# --- what the identity is ---

def test_the_identity_holds_the_settings_that_change_the_model_and_not_the_places(tmp_path):
    settings = identity.settings_of(config_of(tmp_path / "data", tmp_path / "out"))
    assert {"data_uri", "backbone", "alpha", "weights", "image_size", "dense_units", "dropout",
            "seed", "validation_split", "test_split", "head_learning_rate", "fine_tune_from",
            "augment", "augment_views", "label_smoothing", "class_weights", "batch_size",
            "mixed_precision"} <= set(settings)
    assert not {"output_uri", "run_id", "cache_dir", "checkpoint_uri", "model_uri",
                "storage_deadline", "export_onnx", "cache_budget", "cluster"} & set(settings)


def test_the_same_identity_passes():
    same = {"data_uri": "/a", "data_files": 6, "data_listing_digest": "1" * 64, "seed": 42}
    identity.refuse_difference(same, dict(same), "run-1", "its checkpoints")


def test_a_difference_is_one_line_naming_each_setting_both_ways():
    recorded = {"data_uri": "/a", "backbone": "vgg16", "image_size": 32, "seed": 42}
    attempt = {**recorded, "backbone": "mobilenet_v2", "image_size": 96}
    with pytest.raises(ConfigError) as refused:
        identity.refuse_difference(recorded, attempt, "run-1", "its checkpoints")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("RUN_ID=run-1: its checkpoints")
    assert "recorded BACKBONE=vgg16, IMAGE_SIZE=32; this attempt has BACKBONE=mobilenet_v2, " \
           "IMAGE_SIZE=96" in message and "new RUN_ID" in message
    assert "SEED" not in message and "DATA_URI" not in message


def test_changed_data_under_the_same_uri_is_named_as_data_uri_with_its_listing():
    recorded = {"data_uri": "/a", "data_files": 6, "data_listing_digest": "a" * 64}
    attempt = {**recorded, "data_files": 7, "data_listing_digest": "b" * 64}
    expected = (r"recorded DATA_URI=/a \(6 files, listing a{12}\); "
                r"this attempt has DATA_URI=/a \(7 files, listing b{12}\)")
    with pytest.raises(ConfigError, match=expected):
        identity.refuse_difference(recorded, attempt, "run-1", "its checkpoints")


def test_what_a_record_lacks_is_not_compared():
    """A run recorded before the data listing (or a setting) was: only what it holds counts."""
    legacy = {"data_uri": "/a", "backbone": "vgg16"}
    identity.refuse_difference(legacy, {**legacy, "data_files": 6, "data_listing_digest": "c",
                                        "tta": True}, "run-1", "its run")


# --- the data's listing ---

def test_a_local_listing_is_stable_and_changes_with_any_file(images):
    first = listing.of_tree(str(images))
    assert first == listing.of_tree(str(images)) and first.files == 6
    (images / "a" / "a_0.png").write_bytes(b"other")
    rewritten = listing.of_tree(str(images))
    assert rewritten.files == 6 and rewritten.digest != first.digest
    (images / "a" / "a_0.png").rename(images / "a" / "renamed.png")
    assert listing.of_tree(str(images)).digest not in (first.digest, rewritten.digest)
    (images / "b" / "extra.png").write_bytes(b"x")
    assert listing.of_tree(str(images)).files == 7


def test_a_local_listing_walks_a_link_loop_once(images):
    (images / "a" / "loop").symlink_to("..")
    (images / "b" / "broken.png").symlink_to(images / "nowhere.png")
    assert listing.of_tree(str(images)).files == 7  # 6 images and the broken link


def test_a_missing_folder_lists_no_file(tmp_path):
    assert listing.of_tree(str(tmp_path / "absent")).files == 0


def test_a_gs_listing_is_relative_to_the_prefix_and_changes_with_an_object(
        gcs_client, gcs_bucket, images):
    upload_tree(gcs_client, gcs_bucket, "one", images)
    upload_tree(gcs_client, gcs_bucket, "two", images)
    gcs_client.bucket(gcs_bucket).blob("two/folder/").upload_from_string(b"")  # a placeholder
    one = listing.of_tree(f"gs://{gcs_bucket}/one")
    assert one.files == 6 and one == listing.of_tree(f"gs://{gcs_bucket}/two")
    gcs_client.bucket(gcs_bucket).blob("two/a/a_0.png").upload_from_string(b"other bytes")
    assert listing.of_tree(f"gs://{gcs_bucket}/two").digest != one.digest


def test_a_record_reads_back_and_none_answers_for_no_file_or_object(gcs_client, gcs_bucket,
                                                                    tmp_path):
    gcs_client.bucket(gcs_bucket).blob("run/metrics.json").upload_from_string(b'{"a": 1}')
    assert objects.read(f"gs://{gcs_bucket}/run/metrics.json") == b'{"a": 1}'
    assert objects.read(f"gs://{gcs_bucket}/run/absent.json") is None
    assert objects.read(str(tmp_path / "absent.json")) is None


# --- a rerun checked against what the run recorded ---

@pytest.mark.parametrize("complete", [True, False], ids=["complete", "checkpointed"])
@pytest.mark.parametrize("change", [{"BACKBONE": "mobilenet_v2"}, {"WEIGHTS": "none"},
                                    {"IMAGE_SIZE": "64"}, {"DATA_URI": "other"}],
                         ids=lambda change: next(iter(change)))
def test_a_rerun_with_other_data_or_settings_is_refused_naming_them(complete, change, images,
                                                                    tmp_path):
    recorded_run(config_of(images, tmp_path / "out"), complete)
    if "DATA_URI" in change:
        change = {"DATA_URI": str(write_class_images(tmp_path / "other", ["a", "b"], 3, 8))}
    name = next(iter(change))
    with pytest.raises(ConfigError, match=f"RUN_ID=run-1: its (run|checkpoints) at .*{name}="):
        identity.check_rerun(config_of(images, tmp_path / "out", **change))


@pytest.mark.parametrize("complete", [True, False], ids=["complete", "checkpointed"])
def test_a_rerun_after_the_data_changed_is_refused(complete, images, tmp_path):
    recorded_run(config_of(images, tmp_path / "out"), complete)
    (images / "b" / "new.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"\(6 files, .*this attempt has DATA_URI=.*\(7 files"):
        identity.check_rerun(config_of(images, tmp_path / "out"))


@pytest.mark.parametrize("complete", [True, False], ids=["complete", "checkpointed"])
def test_a_rerun_with_the_same_identity_and_other_places_passes(complete, images, tmp_path):
    recorded = recorded_run(config_of(images, tmp_path / "out"), complete)
    again = config_of(images, tmp_path / "out", CACHE_DIR=str(tmp_path / "elsewhere"),
                      STORAGE_DEADLINE="30", CACHE_FEATURES="0")
    assert identity.check_rerun(again) == recorded


def test_a_complete_run_on_gs_is_compared_by_its_metrics_json(gcs_client, gcs_bucket, images,
                                                              tmp_path):
    config = config_of(images, f"gs://{gcs_bucket}/runs", IMAGE_SIZE="64")
    gcs_client.bucket(gcs_bucket).blob("runs/run-1/metrics.json").upload_from_string(
        json.dumps({identity.KEY: identity.of_attempt(config)}))
    identity.check_rerun(config)
    with pytest.raises(ConfigError, match="IMAGE_SIZE=64; this attempt has IMAGE_SIZE=96"):
        identity.check_rerun(config_of(images, f"gs://{gcs_bucket}/runs", IMAGE_SIZE="96"))


def test_a_complete_run_from_before_identities_is_compared_by_its_settings(images, tmp_path):
    config = config_of(images, tmp_path / "out")
    os.makedirs(config.run_uri)
    settings = {**identity.settings_of(config), "cache_dir": "/old/cache"}
    (Path(config.run_uri) / "metrics.json").write_text(json.dumps({"config": settings}))
    identity.check_rerun(config_of(images, tmp_path / "out", CACHE_DIR=str(tmp_path / "c2")))
    other = write_class_images(tmp_path / "other", ["a", "b"], 3, 8)
    with pytest.raises(ConfigError, match=f"recorded DATA_URI={images}; this attempt has "
                                          f"DATA_URI={other} \\(6 files"):
        identity.check_rerun(config_of(other, tmp_path / "out"))


# --- the checkpoints' record, once they are pulled ---

def test_new_checkpoints_record_the_attempt(tmp_path):
    attempt = {"data_uri": "/a", "seed": 42}
    identity.hold(tmp_path, attempt, "run-1")
    assert json.loads((tmp_path / identity.FILE).read_text()) == attempt


def test_checkpoints_of_another_identity_are_refused(tmp_path):
    (tmp_path / identity.FILE).write_text(json.dumps({"data_uri": "/a", "seed": 42}))
    with pytest.raises(ConfigError, match="RUN_ID=run-1: its checkpoints recorded SEED=42"):
        identity.hold(tmp_path, {"data_uri": "/a", "seed": 7}, "run-1")


def test_checkpoints_from_before_identities_resume_with_a_warning_and_record_it(tmp_path, caplog):
    (tmp_path / "state.json").write_text('{"phases": {}}')
    with caplog.at_level(logging.WARNING, logger="job"):
        identity.hold(tmp_path, {"data_uri": "/a"}, "run-1")
    assert "RUN_ID=run-1: its checkpoints record no data or settings" in caplog.text
    assert json.loads((tmp_path / identity.FILE).read_text()) == {"data_uri": "/a"}
