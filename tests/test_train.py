"""Training runs: what each phase changes, what a run writes, and accuracy on real X-rays."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from common import run_files
from common.record import RunRecord
from job.cluster.context import RunContext
from job.config import Config
from job.inputs import data
from job.inputs.features import Features
from job.training import model, probe, serving
from job.training.checkpoint import Checkpoints, StopSignal
from job.training.phases import Trainer, plan
from tests.conftest import run_in_process, run_job, tiny_vgg16_settings, write_class_images


def weights_by_layer(base):
    return {layer.name: [np.array(w) for w in layer.get_weights()]
            for layer in base.layers if layer.weights}


def changed(before, after):
    return sorted(name for name in before
                  if any(not np.array_equal(b, a) for b, a in zip(before[name], after[name])))


@pytest.fixture(scope="module")
def phases(tmp_path_factory):
    """A VGG16 (random weights) trained in-process, with the base's weights before and after each phase."""
    root = tmp_path_factory.mktemp("phases")
    write_class_images(root / "images", ["a", "b"], per_class=16)
    config = Config.from_env(tiny_vgg16_settings(root / "images", root / "out", root / "cache"))
    keras.utils.set_random_seed(config.seed)
    dataset = data.load_dataset(root / "images", 32, 0.25, 0.0, seed=config.seed)
    parts = model.build_classifier(*model.build_base("vgg16", 1.0, None, 32), 2, 32,
                                   config.dense_units, config.dropout)
    context = RunContext(strategy=tf.distribute.get_strategy(), chief=True, run_dir=root / "run",
                         checkpoint_dir=root / "ckpt", scratch_dir=root)
    trainer = Trainer(config, context, dataset, parts,
                      Checkpoints(root / "ckpt", str(root / "ckpt-uri"), "test", StopSignal()))
    head_phase, fine_tune_phase = plan(config)
    snapshots = {"start": weights_by_layer(parts.base)}
    head_before = [np.array(w) for w in parts.head.get_weights()]
    trainer.fit(head_phase)
    snapshots["phase1"] = weights_by_layer(parts.base)
    head_after = [np.array(w) for w in parts.head.get_weights()]
    # What a linear probe fits on after phase 1: the pooled features of the unaugmented images.
    pooled = {name: (parts.feature_extractor.predict(
        data.image_dataset(getattr(dataset, name), 32, 8), verbose=0),
        np.asarray(getattr(dataset, name).labels)) for name in ("train", "validation")}
    trainer.fit(fine_tune_phase)
    snapshots["phase2"] = weights_by_layer(parts.base)
    return {"parts": parts, "snapshots": snapshots, "head": (head_before, head_after),
            "pooled": pooled, "root": root, "dataset": dataset}


@pytest.mark.slow  # trains in-process (the phases fixture)
def test_phase1_trains_the_head_and_leaves_the_base_unchanged(phases):
    snapshots = phases["snapshots"]
    assert changed(snapshots["start"], snapshots["phase1"]) == []
    before, after = phases["head"]
    assert any(not np.array_equal(b, a) for b, a in zip(before, after))


@pytest.mark.slow  # trains in-process (the phases fixture)
def test_phase1_of_the_default_head_is_the_linear_probe_of_the_unaugmented_features(phases):
    """The default head (DENSE_UNITS=0) is linear, and phase 1 leaves it computing what the
    logistic regression solved on the training images' pooled features computes."""
    parts = phases["parts"]
    assert [layer.name for layer in parts.head.layers[1:]] == ["dropout", "probabilities"]
    solved = probe.fit(phases["pooled"]["train"], phases["pooled"]["validation"], balanced=False)
    head_phase_weights = phases["head"][1]
    np.testing.assert_allclose(head_phase_weights[0], solved.dense_weights()[0], rtol=1e-4,
                               atol=1e-6)


@pytest.mark.slow  # trains in-process (the phases fixture)
def test_phase2_changes_only_the_layers_from_fine_tune_from_up(phases):
    snapshots = phases["snapshots"]
    assert changed(snapshots["phase1"], snapshots["phase2"]) == \
        ["block5_conv1", "block5_conv2", "block5_conv3"]


@pytest.mark.slow  # trains in-process (the phases fixture)
def test_saved_model_predicts_what_the_in_memory_model_predicts(phases, tmp_path):
    classifier = phases["parts"].classifier
    images = next(iter(data.image_dataset(phases["dataset"].train, 32, 8)))[0].numpy()
    serving.export(classifier, str(tmp_path / "saved_model"), phases["dataset"].class_names, 0.5)
    reloaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    served = reloaded.signatures[serving.PIXELS_SIGNATURE](image=tf.constant(images))["output_0"]
    served = served.numpy()
    np.testing.assert_allclose(served, classifier.predict(images, verbose=0), atol=1e-5)


def test_job_exits_0_solves_the_probe_and_logs_one_line_per_fine_tuning_epoch(tiny_run):
    result = tiny_run["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "INFO job: phase 1: linear probe on " in result.stderr
    assert "INFO job: phase 1 epoch" not in result.stderr  # solved, not trained by epochs
    lines = [l for l in result.stderr.splitlines() if "INFO job: phase 2 epoch" in l]
    assert len(lines) == 2 and "val_accuracy=" in lines[0]


def test_the_frozen_layers_passes_log_no_retracing_warning(tiny_run):
    """Each pass of frozen layers runs its batches, the last one smaller, through one trace.
    (TensorFlow counts traces by function code across the process: Keras' predict functions of
    the models earlier tests built in this one may warn too, which a job's own process does not.)"""
    warnings = [line for line in tiny_run["result"].stderr.splitlines() if "retracing" in line]
    assert not [line for line in warnings if "Features." in line], warnings


def test_job_writes_every_output_and_the_manifest_lists_them(tiny_run):
    run_dir = tiny_run["run_dir"]
    expected = {"MANIFEST.json", "metrics.json", "labels.txt", "model.keras", "model_summary.txt",
                "curves_phase2.png", "saved_model", "report.html",
                "test_predictions.json", "audit.json"}
    assert expected <= {p.name for p in run_dir.iterdir()}
    manifest = json.loads((run_dir / run_files.MANIFEST).read_text())["files"]
    assert "saved_model/saved_model.pb" in manifest and "metrics.json" in manifest
    assert "report.html" in manifest and "test_predictions.json" in manifest
    for name, entry in manifest.items():
        assert (run_dir / name).stat().st_size == entry["bytes"]
        assert run_files.sha256(run_dir / name) == entry["sha256"]


def test_labels_are_the_sorted_class_names(tiny_run):
    assert (tiny_run["run_dir"] / "labels.txt").read_text().split() == ["cat", "dog", "fox"]


def test_the_runs_saved_model_serves_image_bytes_by_default_and_pixels_as_serve(tiny_run):
    """job/training/serving.py: what Vertex AI's TF Serving calls takes encoded images and names the class
    from labels.txt; the float32 signature the export converts is still there."""
    loaded = tf.saved_model.load(str(tiny_run["run_dir"] / "saved_model"))
    default, pixels = loaded.signatures["serving_default"], loaded.signatures["serve"]
    assert list(default.structured_input_signature[1]) == ["image_bytes"]
    assert list(pixels.structured_input_signature[1]) == ["image"]
    images = sorted((tiny_run["run_dir"].parents[1] / "images" / "fox").glob("*.png"))[:2]
    served = default(image_bytes=tf.constant([path.read_bytes() for path in images]))
    assert served["probabilities"].shape == (2, 3)
    assert set(served["label"].numpy()) <= {b"cat", b"dog", b"fox"}


def test_metrics_record_config_history_evaluation_and_skipped_files(tiny_run):
    metrics = json.loads((tiny_run["run_dir"] / "metrics.json").read_text())
    assert metrics["config"]["backbone"] == "vgg16" and metrics["precision_policy"] == "float32"
    assert metrics["versions"]["tensorflow"] == tf.__version__
    assert metrics["hardware"]["cpus"] == os.cpu_count() and metrics["hardware"]["cpu"]
    assert metrics["skipped_files"] == {"dog/broken.jpg": "not an image (unknown format)"}
    assert metrics["class_counts"]["train"] == {"cat": 10, "dog": 10, "fox": 10}
    assert metrics["phase1"]["epochs_run"] == 0 and metrics["phase1"]["probe"]["C"] > 0
    assert metrics["phase2"]["epochs_run"] == 2 and len(metrics["phase2"]["history"]["val_loss"]) == 2
    assert metrics["phase2"]["images_per_second"] > 0
    assert metrics["phase1"]["cached"] is True and metrics["phase2"]["cached"] is True
    test = metrics["test"]
    assert set(test["per_class"]) == {"cat", "dog", "fox"}
    assert np.array(test["confusion_matrix"]).sum() == test["images"] == 3
    assert 0 <= test["accuracy"] <= 1
    assert metrics["parameters"]["phase2"]["trainable"] > metrics["parameters"]["phase1"]["trainable"]


def test_metrics_hold_the_typed_record_the_export_reads(tiny_run):
    metrics = json.loads((tiny_run["run_dir"] / "metrics.json").read_text())
    record = RunRecord.from_metrics(metrics)
    assert record.classes == ["cat", "dog", "fox"] and record.backbone == "vgg16"
    assert record.image_size == 32 and record.precision_policy == "float32"
    assert record.decision_threshold == metrics["decision_threshold"] == 0.5
    assert record.data_uri == metrics["config"]["data_uri"]


def test_model_summary_counts_trainable_and_frozen_parameters(tiny_run):
    text = (tiny_run["run_dir"] / "model_summary.txt").read_text()
    assert "== after phase1 ==" in text and "== after phase2 ==" in text and "'frozen'" in text


def test_a_completed_run_is_left_untouched(tiny_run):
    run_dir = tiny_run["run_dir"]
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    result = run_in_process("job", tiny_run["settings"])
    assert result.returncode == 0
    assert "already complete" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def cached_features(root, parts=None, available_bytes=2**40, **overrides) -> Features:
    """The features of 2 x 6 tiny images cached under root, by parts or else by a new VGG16
    (random weights), with available_bytes of scratch disk for the caches."""
    write_class_images(root / "images", ["a", "b"], per_class=6)
    config = Config.from_env(tiny_vgg16_settings(root / "images", root / "out", root / "cache",
                                                 **overrides))
    keras.utils.set_random_seed(config.seed)
    dataset = data.load_dataset(root / "images", 32, 0.34, 0.0, seed=config.seed)
    parts = parts or model.build_classifier(*model.build_base("vgg16", 1.0, None, 32), 2, 32, 8, 0.5)
    return Features(config, dataset, parts, root, batch_size=8, available_bytes=available_bytes)


def cached_train_outputs(features: Features, head: bool) -> np.ndarray:
    return np.stack([x.numpy() for x, _ in features.frozen_outputs(head)["train"]])


def test_augmented_views_are_cached_once_per_view_and_seeded(tmp_path):
    # A head trained by epochs (DENSE_UNITS > 0) fits on the views' pooled features.
    features = cached_features(tmp_path / "one", AUGMENT="1", AUGMENT_VIEWS="3", DENSE_UNITS="8")
    bottom_outputs = cached_train_outputs(features, head=False)
    assert len(bottom_outputs) == 3 * len(features.dataset.train)
    views = np.split(bottom_outputs, 3)
    assert not np.allclose(views[0], views[1])
    pooled = cached_train_outputs(features, head=True)
    upper = features.fine_tuning_parts[1]
    np.testing.assert_allclose(pooled, upper.predict(bottom_outputs, verbose=0), rtol=1e-5, atol=1e-5)
    # The same weights: random initial weights come from Python's global generator, which other
    # threads of this process may draw from at any time (google-cloud-storage fetches bucket
    # metadata in the background, retrying with a random back-off after a storage test).
    again = cached_features(tmp_path / "two", features.parts, AUGMENT="1", AUGMENT_VIEWS="3",
                            DENSE_UNITS="8")
    np.testing.assert_array_equal(cached_train_outputs(again, head=False), bottom_outputs)


def test_the_probe_fits_on_the_unaugmented_training_images_and_fine_tuning_on_the_views(tmp_path):
    features = cached_features(tmp_path, AUGMENT="1", AUGMENT_VIEWS="3")  # DENSE_UNITS=0
    pooled = cached_train_outputs(features, head=True)
    unaugmented = features.parts.feature_extractor.predict(features.images("train"), verbose=0)
    np.testing.assert_allclose(pooled, unaugmented, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features.probe_data()["train"][0], unaugmented, rtol=1e-5, atol=1e-5)
    assert len(cached_train_outputs(features, head=False)) == 3 * len(features.dataset.train)


def test_tta_caches_the_flipped_images(tmp_path):
    inputs = cached_features(tmp_path, TTA="1").frozen_inputs()
    images = next(iter(inputs["validation"][0]))[0].numpy()
    np.testing.assert_array_equal(next(iter(inputs["validation_flipped"][0]))[0].numpy(),
                                  images[:, :, ::-1])


def test_augmented_binary_run_trains_both_phases_through_the_frozen_base(tmp_path):
    images = write_class_images(tmp_path / "images", ["no", "yes"], per_class=10)
    result = run_in_process("job", tiny_vgg16_settings(
        images, tmp_path / "out", tmp_path / "cache", AUGMENT="1", CACHE_FEATURES="0", TTA="1",
        HEAD_EPOCHS="1", FINE_TUNE_EPOCHS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "tiny" / "metrics.json").read_text())
    assert metrics["phase1"]["cached"] is False and metrics["phase2"]["cached"] is False
    assert metrics["test"]["roc_auc"] is not None
    assert metrics["test"]["without_tta"]["roc_auc"] is not None
    # Two validation images a class: too few to choose a threshold on, and metrics.json says so.
    assert metrics["decision_threshold"] == 0.5
    assert any(warning.startswith("decision threshold 0.5, not chosen on validation")
               for warning in metrics["evaluation_warnings"])
    assert "WARNING job: evaluation after phase 2: decision threshold 0.5" in result.stderr


def test_weights_none_trains_every_layer_from_scratch_in_one_phase_on_the_images(tmp_path):
    images = write_class_images(tmp_path / "images", ["a", "b"], per_class=8)
    result = run_in_process("job", tiny_vgg16_settings(
        images, tmp_path / "out", tmp_path / "cache", WEIGHTS="none", HEAD_EPOCHS="2",
        FINE_TUNE_EPOCHS="1", PATIENCE="5"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "tiny" / "metrics.json").read_text())
    assert metrics["phase2"] is None
    assert metrics["phase1"]["epochs_run"] == 3 and metrics["phase1"]["cached"] is False
    assert "probe" not in metrics["phase1"]
    assert metrics["parameters"]["phase1"]["frozen"] == 0  # VGG16 has no BatchNormalization
    assert metrics["cache"]["phase_bytes"] == {}


def test_imagenet_weights_that_cannot_be_downloaded_fail_fast_naming_weights(tmp_path):
    images = write_class_images(tmp_path / "images", ["a", "b"], per_class=4)
    settings = tiny_vgg16_settings(images, tmp_path / "out", tmp_path / "cache", WEIGHTS="imagenet",
                                   KERAS_HOME=str(tmp_path / "keras"),
                                   HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    result = run_job(settings, timeout=180)
    assert result.returncode == 2
    assert "WEIGHTS=imagenet: could not get the ImageNet weights of vgg16" in result.stderr
    assert not (tmp_path / "out" / "tiny" / run_files.MANIFEST).exists()


@pytest.mark.slow
def test_real_xrays_with_pretrained_mobilenet_v2_beat_chance_clearly(xray_subset, mobilenet_v2_weights,
                                                                     tmp_path):
    result = run_in_process("job", {
        "DATA_URI": str(xray_subset), "OUTPUT_URI": str(tmp_path / "out"), "RUN_ID": "xray",
        "CACHE_DIR": str(tmp_path / "cache"), "BACKBONE": "mobilenet_v2", "ALPHA": "0.5",
        "WEIGHTS": str(mobilenet_v2_weights), "IMAGE_SIZE": "160", "HEAD_EPOCHS": "15",
        "FINE_TUNE_EPOCHS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "xray" / "metrics.json").read_text())
    assert metrics["test"]["images"] == 100
    assert metrics["test"]["accuracy"] >= 0.75, metrics["test"]
    assert metrics["test"]["roc_auc"] >= 0.85, metrics["test"]
