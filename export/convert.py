"""Convert: the run's classifier, rebuilt in float32, to an opset-pinned ONNX graph with metadata.

Keras 3 models are not traced by tf2onnx's from_keras; a tf.function around the rebuilt model is
(tf2onnx.convert.from_function). Rebuilding under the float32 policy with the run's weights gives a
float32 graph even when training used mixed precision, where the SavedModel computes in float16.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np

from common import run_files
from common.record import RunRecord
from export.errors import BadInput, ExportError

log = logging.getLogger("export")

INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "image", "probabilities", "batch"


@contextlib.contextmanager
def float32_policy():
    """The global Keras dtype policy set to float32 for the block, restored afterwards."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def rebuild_float32(run_dir: Path, record: RunRecord):
    """The run's classifier rebuilt under the float32 policy, with every weight of model.keras.

    Returns (float32 keras.Model, the loaded model.keras model; None for a hub backbone, see
    saved_model_as_float32). Raises BadInput when the run cannot be rebuilt (architecture
    mismatch, a hub backbone trained under mixed precision).
    """
    import keras

    from job.config import BACKBONES
    from job.training import model as job_model

    if record.backbone not in BACKBONES:
        return saved_model_as_float32(run_dir, record), None
    with float32_policy():
        base, mode = job_model.build_base(record.backbone, record.alpha, None, record.image_size)
        parts = job_model.build_classifier(base, mode, len(record.classes), record.image_size,
                                           record.dense_units, record.dropout)
    trained = keras.saving.load_model(run_dir / run_files.KERAS_MODEL, compile=False)
    source = trained.get_weights()
    try:
        parts.classifier.set_weights(source)
    except ValueError as error:
        raise BadInput(f"{run_dir / 'model.keras'}: its weights do not fit the architecture in "
                       f"metrics.json ({str(error).splitlines()[0][:200]})") from None
    copied = parts.classifier.get_weights()
    if len(copied) != len(source) or not all(
            np.array_equal(a, np.asarray(b, dtype=a.dtype)) for a, b in zip(copied, source)):
        raise ExportError("the float32 rebuild does not hold the same weights as model.keras")
    non_float32 = sorted({w.dtype for w in parts.classifier.weights} - {"float32"})
    if non_float32 or parts.classifier.compute_dtype != "float32":
        raise ExportError(f"the rebuild is not float32 (weights {non_float32}, compute "
                          f"{parts.classifier.compute_dtype})")
    return parts.classifier, trained


def saved_model_as_float32(run_dir: Path, record: RunRecord):
    """A hub backbone's run as a Keras model: its SavedModel, called as served.

    A hub module has no architecture in code to rebuild, and model.keras would load it again
    from the path it was fetched to in training (through a layer Keras only loads when told to
    trust it); the run's SavedModel holds the module with its fine-tuned weights. Only a float32
    run: under mixed precision its head computes in float16 and nothing rebuilds it in float32.
    """
    import keras

    if record.mixed_precision:
        raise BadInput(f"backbone {record.backbone!r} (a hub module) trained under "
                       f"{record.precision_policy}: only a float32 hub run can be exported "
                       "(train it with MIXED_PRECISION=off)")
    size = record.image_size
    images = keras.Input((size, size, 3), name=INPUT_NAME)
    from job.training.serving import PIXELS_SIGNATURE

    served = keras.layers.TFSMLayer(str(run_dir / run_files.SAVED_MODEL),
                                    call_endpoint=PIXELS_SIGNATURE, trainable=False,
                                    name="saved_model")
    return keras.Model(images, served(images), name="classifier")


def to_onnx(classifier, image_size: int, opset: int):
    """The float32 classifier as an ONNX ModelProto: input `image` [batch, S, S, 3], output
    `probabilities`, the batch dimension dynamic."""
    import tensorflow as tf
    import tf2onnx

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(image):
        return {OUTPUT_NAME: classifier(image, training=False)}

    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature,
                                                 opset=opset)
    except Exception as error:  # tf2onnx raises many types; name the cause on one line
        raise ExportError(f"tf2onnx could not convert the model: {error.__class__.__name__}: "
                          f"{str(error).splitlines()[0][:300]}") from None
    for value in (*proto.graph.input, *proto.graph.output):
        first = value.type.tensor_type.shape.dim[0]
        if not first.dim_value:
            first.dim_param = BATCH_DIM
    return proto


def metadata(record: RunRecord, run_uri: str, opset: int, precision: str) -> dict[str, str]:
    """What a consumer needs to use the model without the run directory, as metadata_props."""
    classes, size = record.classes, record.image_size
    if len(classes) == 2:
        output = (f"{OUTPUT_NAME}: float32 [batch, 1], sigmoid probability of class index 1 "
                  f"({classes[1]!r}); class 0 ({classes[0]!r}) has 1 - p; label = class 1 when "
                  f"p >= decision_threshold")
    else:
        output = (f"{OUTPUT_NAME}: float32 [batch, {len(classes)}], softmax probabilities in the "
                  "order of labels")
    return {
        "labels": json.dumps(classes),
        "image_size": str(size),
        "input": f"{INPUT_NAME}: float32 [batch, {size}, {size}, 3] NHWC",
        "preprocessing": f"RGB 0-255, resized bilinear to {size} x {size} with "
                         "edge.images.load_image (the model normalises internally)",
        "output": output,
        "decision_threshold": str(record.decision_threshold),
        "source_run_id": record.run_id,
        "source_run_uri": run_uri,
        "backbone": record.backbone,
        "training_precision_policy": record.precision_policy,
        "precision": precision,
        "opset": str(opset),
    }


def save(proto, path: Path) -> None:
    import onnx

    onnx.save(proto, str(path))


def load(path: Path):
    import onnx

    return onnx.load(str(path))


def set_metadata(proto, values: dict[str, str]) -> None:
    existing = {prop.key: prop for prop in proto.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            prop = proto.metadata_props.add()
            prop.key, prop.value = key, value


def opset_of(proto) -> int:
    """The version of the default ONNX domain that a graph imports."""
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def check(proto) -> None:
    """onnx.checker with full shape inference; raises ExportError naming the problem."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"onnx.checker rejected the graph: {str(error).splitlines()[0][:300]}") \
            from None


def float16_tensors(proto) -> list[str]:
    """Names of every float16/bfloat16 initializer, value, input, output or Cast target in a graph."""
    import onnx

    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    names = [i.name for i in proto.graph.initializer if i.data_type in half]
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        if value.type.tensor_type.elem_type in half:
            names.append(value.name)
    for node in proto.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i in half:
                names.append(node.name)
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in half:
                names.append(node.name)
    return names
