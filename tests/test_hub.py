"""A hub backbone for real: a SavedModel image feature-vector module (MobileNetV2 0.35 with its
ImageNet weights, saved as TF-Hub's TF2 modules are) as BACKBONE, fine-tuned whole by the job on
real X-rays, and its run exported to ONNX."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from devkit.datasets import link_slice
from tests.conftest import EXPORT_SETTINGS, run_record, train_run


def signature_variables(saved_model, signature: str = "serving_default") -> dict[str, tuple]:
    """{name: (value, trainable)} of the variables a SavedModel's signature reads."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model))  # alive while its variables are read
    return {v.name: (v.numpy(), v.trainable) for v in loaded.signatures[signature].variables}


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory, xray_dir, hub_feature_vector):
    """The job (its main, in this process) on the module: 64 px, one epoch per phase, 16 training X-rays per class;
    then, in the same process (EXPORT_ONNX=1, one TensorFlow start fewer), the float32 export."""
    data = link_slice(xray_dir, tmp_path_factory.mktemp("xray-hub"),
                      {"train": 16, "validation": 8, "test": 16})
    return train_run(tmp_path_factory, data, "hub", BACKBONE=str(hub_feature_vector),
                     IMAGE_SIZE="64", HEAD_EPOCHS="1", FINE_TUNE_EPOCHS="1",
                     EXPORT_ONNX="1", **{**EXPORT_SETTINGS, "INT8": "0"})


@pytest.fixture(scope="module")
def hub_base(hub_feature_vector):
    """The module as the job builds its base (frozen, as phase 1 leaves it)."""
    from job.training.model import build_base

    base, mode = build_base(str(hub_feature_vector), 1.0, None, 64)
    assert mode == "unit"  # TF-Hub's image modules take [0, 1]
    return base


def test_an_optimizer_makes_slots_for_the_very_variables_a_hub_module_reads(hub_base):
    import keras

    hub_base.trainable = True  # as phase 2 does
    try:
        read = {id(v) for v in hub_base.call_endpoint_fn.variables}
        assert len(hub_base.trainable_weights) == 156  # 52 kernels, 52 BN gamma and beta
        assert all(id(weight.value) in read for weight in hub_base.weights)
        assert hub_base.weights[0].name == "Conv1_kernel"  # the module's "Conv1/kernel:0"
        keras.optimizers.RMSprop().build(hub_base.trainable_weights)  # "not a valid scope name"
    finally:
        hub_base.trainable = False


def test_a_hub_module_runs_in_inference_mode_whatever_training_says(hub_base):
    import tensorflow as tf

    images = tf.random.uniform((2, 64, 64, 3))
    # Its signature was traced in inference mode, and there is no training endpoint to switch to.
    np.testing.assert_array_equal(hub_base(images, training=True)["feature_vector"],
                                  hub_base(images, training=False)["feature_vector"])


def test_a_hub_module_takes_float32_images_under_mixed_precision(hub_feature_vector):
    import keras

    from job.training.model import build_base, build_classifier

    keras.mixed_precision.set_dtype_policy("mixed_float16")  # set before the job builds its base
    try:
        base, mode = build_base(str(hub_feature_vector), 1.0, None, 64)
        parts = build_classifier(base, mode, 2, 64, dense_units=8, dropout=0.5)
        probabilities = parts.classifier(np.full((1, 64, 64, 3), 128.0, np.float32))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert parts.head.get_layer("dense").compute_dtype == "float16"
    assert probabilities.shape == (1, 1)  # the signature refused float16 images before


def test_job_fine_tunes_a_saved_model_feature_vector_module_through_both_phases(
        hub_run, hub_feature_vector):
    metrics = json.loads((hub_run / "metrics.json").read_text())
    assert metrics["phase1"]["probe"]["C"] > 0 and metrics["phase2"]["epochs_run"] == 1
    assert metrics["phase2"]["cached"] is False  # a module cannot be cut: it trains on images
    module = signature_variables(hub_feature_vector)
    tuned = signature_variables(hub_run / "saved_model")  # the deployed classifier's
    trainable = [name for name, (_, is_trainable) in module.items() if is_trainable]
    statistics = [name for name in module if name not in trainable]  # BN moving mean, variance
    changed = {name for name in module if not np.array_equal(module[name][0], tuned[name][0])}
    assert changed == set(trainable) and len(statistics) == 104
    sizes = {name: value.size for name, (value, _) in module.items()}
    parameters = metrics["parameters"]
    assert parameters["phase2"]["trainable"] - parameters["phase1"]["trainable"] == \
        sum(sizes[name] for name in trainable)
    assert parameters["phase2"]["frozen"] == sum(sizes[name] for name in statistics)
    assert metrics["test"]["roc_auc"] >= 0.8, metrics["test"]  # ImageNet features: 0.98 measured


def test_export_of_the_hub_run_gives_a_float32_onnx_model_within_the_parity_gate(hub_run):
    report = json.loads((hub_run / "export_report.json").read_text())
    assert report["status"] == "passed" and set(report["files"]) == {"model.onnx"}
    parity = report["parity"]
    assert parity["reference"] == "tensorflow"  # the run's SavedModel
    assert parity["images"] == parity["test_split_images"] == 32
    assert parity["float32"]["max_abs_diff"] <= 1e-4 and parity["float32"]["top1_agreement"] == 1.0
    model = onnx.load(str(hub_run / "model.onnx"))
    onnx.checker.check_model(model)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert json.loads(metadata["parity"])["status"] == "passed"


def test_the_export_refuses_a_hub_run_trained_under_mixed_precision(tmp_path):
    from export.convert import rebuild_float32
    from export.errors import BadInput

    record = run_record(backbone="/modules/feature_vector", precision_policy="mixed_float16")
    with pytest.raises(BadInput, match="only a float32 hub run can be exported"):
        rebuild_float32(tmp_path, record)
