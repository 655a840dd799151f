"""The job's settings: defaults, per-backbone choices, one clear error per bad value; and
docs/settings.md documenting every variable the job and the export read (flags, --help and the
page's freshness: tests/test_settings.py)."""
from pathlib import Path

import pytest

from export.config import ExportConfig
from job.config import Config, ConfigError
from tests.conftest import run_in_process


def config(**env) -> Config:
    return Config.from_env({"DATA_URI": "/data", **env})


def test_missing_data_uri_names_the_variable():
    with pytest.raises(ConfigError, match="DATA_URI is required"):
        Config.from_env({})


@pytest.mark.parametrize("name, value, accepts", [
    ("BATCH_SIZE", "abc", "an integer >= 1"),
    ("BATCH_SIZE", "0", "an integer >= 1"),
    ("HEAD_EPOCHS", "-1", "an integer >= 0"),
    ("FINE_TUNE_EPOCHS", "2.5", "an integer >= 0"),
    ("IMAGE_SIZE", "16", "an integer >= 32"),
    ("BACKBONE", "alexnet", "one of vgg16, mobilenet_v2, resnet50, efficientnet_b0"),
    ("ALPHA", "0.6", "one of 0.35, 0.5"),
    ("WEIGHTS", "random", "imagenet, none, or a path"),
    ("HEAD_LEARNING_RATE", "-0.1", "a positive number"),
    ("FINE_TUNE_LEARNING_RATE", "nan", "a positive number"),
    ("DROPOUT", "1.5", "a number from 0 to 1"),
    ("LABEL_SMOOTHING", "1", "a number from 0 to below 1"),
    ("VALIDATION_SPLIT", "1", "a number from 0 to below 1"),
    ("AUGMENT", "maybe", "one of 1, 0, true, false"),
    ("AUGMENT_VIEWS", "0", "an integer >= 1"),
    ("TTA", "flip", "one of 1, 0, true, false"),
    ("MIXED_PRECISION", "half", "one of auto, off, float16, bfloat16"),
    ("CLASS_WEIGHTS", "balanced", "one of auto, off"),
    ("SEED", "-3", "an integer >= 0"),
    ("RUN_ID", "../escape", "letters, digits"),
])
def test_bad_value_names_the_variable_and_what_it_accepts(name, value, accepts):
    with pytest.raises(ConfigError) as error:
        config(**{name: value})
    message = str(error.value)
    assert message.startswith(f"{name}={value!r} is not valid")
    assert accepts in message
    assert "\n" not in message


def test_vgg16_defaults_follow_the_classic_recipe():
    settings = config()
    assert (settings.backbone, settings.image_size, settings.fine_tune_from) == \
        ("vgg16", 150, "block5_conv1")
    assert settings.fine_tune_learning_rate == 1e-5


@pytest.mark.parametrize("backbone, layer", [
    ("mobilenet_v2", "block_13_expand"),
    ("resnet50", "conv5_block1_1_conv"),
    ("efficientnet_b0", "block7a_expand_conv"),
])
def test_other_backbones_default_to_native_size_and_their_top_block(backbone, layer):
    settings = config(BACKBONE=backbone)
    assert (settings.image_size, settings.fine_tune_from) == (224, layer)


def test_outputs_go_under_output_uri_and_run_id():
    settings = config(OUTPUT_URI="gs://bucket/runs", RUN_ID="nightly-7")
    assert settings.run_uri == "gs://bucket/runs/nightly-7"
    assert settings.model_uri == "gs://bucket/runs/nightly-7/saved_model"
    assert settings.checkpoint_uri == "gs://bucket/runs/nightly-7/checkpoints"


def test_vertex_ai_directories_are_honoured_with_one_checkpoint_prefix_per_run():
    settings = config(AIP_MODEL_DIR="gs://b/model", AIP_CHECKPOINT_DIR="gs://b/ckpt",
                      AIP_TENSORBOARD_LOG_DIR="gs://b/tb", RUN_ID="r1")
    assert (settings.model_uri, settings.checkpoint_uri, settings.tensorboard_uri) == \
        ("gs://b/model", "gs://b/ckpt/r1", "gs://b/tb")


def test_checkpoint_uri_holds_one_prefix_per_run_id():
    settings = config(OUTPUT_URI="gs://b/runs", CHECKPOINT_URI="gs://b/ckpt/", RUN_ID="r1")
    assert settings.checkpoint_uri == "gs://b/ckpt/r1"


@pytest.mark.parametrize("name, value, problem", [
    ("CHECKPOINT_URI", "gs://b/ck/../../../../../victim", "'..' component"),
    ("DATA_URI", "gs://b/v/../../../../victim", "'..' component"),
    ("OUTPUT_URI", "gs://b/runs/./x", "'.' or '..' component"),
    ("DATA_URI", "gs://b//data", "empty component"),
    ("DATA_URI", "gs://Bucket/data", "bucket name"),
    ("CACHE_DIR", "/tmp/a\0b", "NUL"),
])
def test_uri_with_dot_empty_or_nul_components_is_refused(name, value, problem):
    with pytest.raises(ConfigError) as error:
        config(**{name: value})
    assert str(error.value).startswith(f"{name}={value!r} is not valid") and problem in str(error.value)


@pytest.mark.parametrize("env, first, second", [
    ({"OUTPUT_URI": "gs://b/runs", "CHECKPOINT_URI": "gs://b/runs"}, "OUTPUT_URI/RUN_ID",
     "CHECKPOINT_URI/RUN_ID"),
    ({"OUTPUT_URI": "gs://b/runs", "CHECKPOINT_URI": "gs://b/runs/r1/ckpt"}, "OUTPUT_URI/RUN_ID",
     "CHECKPOINT_URI/RUN_ID"),
    ({"DATA_URI": "gs://b/data", "OUTPUT_URI": "gs://b/data"}, "DATA_URI", "OUTPUT_URI/RUN_ID"),
    ({"DATA_URI": "gs://b/data", "CHECKPOINT_URI": "gs://b/data"}, "DATA_URI", "CHECKPOINT_URI/RUN_ID"),
    ({"DATA_URI": "/srv/images", "CACHE_DIR": "/srv/images/.cache"}, "DATA_URI", "CACHE_DIR"),
    ({"OUTPUT_URI": "/srv/runs", "CACHE_DIR": "/srv"}, "OUTPUT_URI/RUN_ID", "CACHE_DIR"),
    ({"DATA_URI": "/srv/images", "AIP_MODEL_DIR": "/srv/images/model"}, "DATA_URI", "AIP_MODEL_DIR"),
])
def test_places_that_overlap_are_refused_naming_both(env, first, second):
    with pytest.raises(ConfigError) as error:
        config(RUN_ID="r1", **env)
    message = str(error.value)
    assert message.startswith(f"{first} (") and f" and {second} (" in message
    assert "overlap" in message and "\n" not in message


def test_default_checkpoints_and_model_inside_the_run_directory_are_allowed():
    settings = config(OUTPUT_URI="gs://b/runs", RUN_ID="r1", CACHE_DIR="/tmp/cache")
    assert settings.checkpoint_uri == "gs://b/runs/r1/checkpoints"


def test_local_uris_are_made_absolute():
    settings = config(DATA_URI="images", OUTPUT_URI="../runs")
    assert settings.data_uri == str(Path.cwd() / "images")
    assert settings.output_uri == str(Path.cwd().parent / "runs")


def test_hub_handle_is_accepted_as_a_backbone():
    handle = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5"
    settings = config(BACKBONE=handle)
    assert settings.is_hub_backbone and settings.image_size == 224 and settings.fine_tune_from == ""


def test_augmentation_is_on_by_default_as_cached_views_and_tta_off():
    settings = config()
    assert (settings.augment, settings.augment_views, settings.cache_features, settings.tta) == \
        (True, 2, True, False)


def test_mobilenet_v2_fine_tunes_its_top_four_blocks_at_1e_4():
    settings = config(BACKBONE="mobilenet_v2")
    assert (settings.fine_tune_from, settings.fine_tune_learning_rate) == ("block_13_expand", 1e-4)


def test_augmented_views_and_tta_are_read():
    settings = config(AUGMENT="1", AUGMENT_VIEWS="2", TTA="on")
    assert (settings.augment, settings.augment_views, settings.tta) == (True, 2, True)


def test_cache_dir_is_a_path():
    assert config(CACHE_DIR="/tmp/c").cache_dir == Path("/tmp/c")


@pytest.mark.parametrize("read", [lambda value: config(CACHE_DIR=value),
                                  lambda value: ExportConfig.from_env({"RUN_URI": "/runs/r",
                                                                       "CACHE_DIR": value})],
                         ids=["job", "export"])
@pytest.mark.parametrize("value", ["gs://b/cache", "s3://b/cache"])
def test_a_cache_dir_that_is_a_uri_is_refused_as_not_a_local_folder(read, value, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"CACHE_DIR='{value}' is not valid: expected a local folder"):
        read(value)
    assert list(tmp_path.iterdir()) == []  # no ./gs:/b/cache


def test_bad_value_exits_2_with_one_line_before_any_work(tmp_path, main_in_process):
    result = main_in_process("job", {"DATA_URI": str(tmp_path / "absent"), "HEAD_EPOCHS": "-1"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if " ERROR job: " in line]
    assert len(errors) == 1 and "HEAD_EPOCHS='-1' is not valid" in errors[0]


def test_fine_tune_from_naming_no_layer_exits_2_before_touching_data(tmp_path):
    result = run_in_process("job", {"DATA_URI": str(tmp_path / "absent"),
                                    "FINE_TUNE_FROM": "block9_conv1", "WEIGHTS": "none",
                                    "IMAGE_SIZE": "32"})
    assert result.returncode == 2
    assert "FINE_TUNE_FROM='block9_conv1' names no layer of vgg16" in result.stderr
    assert "block5_conv1" in result.stderr


@pytest.mark.parametrize("entrypoint_config, required", [
    (Config, {"DATA_URI": "/data"}), (ExportConfig, {"RUN_URI": "/runs/run-1"})])
def test_every_variable_an_entrypoint_reads_is_documented_in_docs_settings(entrypoint_config, required):
    class RecordingEnvironment(dict):
        def __init__(self, **values):
            super().__init__(values)
            self.read: set[str] = set()

        def get(self, name, default=None):
            self.read.add(name)
            return super().get(name, default)

    environment = RecordingEnvironment(**required)
    entrypoint_config.from_env(environment)
    page = (Path(__file__).parents[1] / "docs" / "settings.md").read_text()
    assert len(environment.read) > 5
    assert [name for name in sorted(environment.read) if f"`{name}`" not in page] == []


def test_a_bad_export_setting_with_export_onnx_exits_2_before_training(tmp_path, main_in_process):
    result = main_in_process("job", {"DATA_URI": str(tmp_path / "absent"), "EXPORT_ONNX": "1",
                                     "OPSET": "99"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if " ERROR job: " in line]
    assert len(errors) == 1 and "OPSET='99' is not valid" in errors[0]


def test_promotion_is_off_unless_promote_uri_is_set_and_drops_one_point_by_default():
    config = Config.from_env({"DATA_URI": "/data"})
    assert config.promote_uri == "" and config.promote_max_drop == 0.01
    config = Config.from_env({"DATA_URI": "/data", "PROMOTE_URI": "gs://b/production",
                              "PROMOTE_MAX_DROP": "0.02", "PROMOTE_MIN_ACCURACY": "0.9"})
    assert (config.promote_uri, config.promote_max_drop, config.promote_min_accuracy) == \
        ("gs://b/production", 0.02, 0.9)
    with pytest.raises(ConfigError, match="PROMOTE_MAX_DROP='2'"):
        Config.from_env({"DATA_URI": "/data", "PROMOTE_MAX_DROP": "2"})


def test_a_promote_uri_overlapping_the_runs_is_refused_naming_both():
    with pytest.raises(ConfigError, match="OUTPUT_URI/RUN_ID .* and PROMOTE_URI"):
        Config.from_env({"DATA_URI": "/data", "OUTPUT_URI": "gs://b/runs", "RUN_ID": "r1",
                         "PROMOTE_URI": "gs://b/runs"})


def test_cross_split_duplicates_stay_in_training_unless_drop_cross_split_duplicates_is_set():
    assert not Config.from_env({"DATA_URI": "/data"}).drop_cross_split_duplicates
    assert Config.from_env({"DATA_URI": "/data",
                            "DROP_CROSS_SPLIT_DUPLICATES": "1"}).drop_cross_split_duplicates
