"""Model: the pretrained conv base, its preprocessing, the dense head, and what phase 2 unfreezes.

The deployable classifier takes plain RGB pixel values 0-255 (`image`, float32, NHWC) and holds
the backbone's own preprocessing, so callers never normalise. It is assembled from three parts
that share weights: `feature_extractor` (preprocessing, conv base, global average pooling),
`head` (Dense, Dropout, output) and `classifier` (both). Phase 1 can therefore train the head
alone on cached features and the classifier sees the result.
"""
from __future__ import annotations

import dataclasses
import re

import keras
from keras import layers, ops

# Per backbone: the Keras application and how it expects its pixels.
_APPLICATIONS = {
    "vgg16": (lambda **kw: keras.applications.VGG16(**kw), "caffe"),
    "resnet50": (lambda **kw: keras.applications.ResNet50(**kw), "caffe"),
    "mobilenet_v2": (lambda alpha, **kw: keras.applications.MobileNetV2(alpha=alpha, **kw), "tf"),
    "efficientnet_b0": (lambda **kw: keras.applications.EfficientNetB0(**kw), "raw"),
}
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="job")
class Preprocess(layers.Layer):
    """Maps RGB pixels 0-255 to what a backbone was trained on.

    caffe: RGB->BGR and ImageNet mean subtraction (VGG16, ResNet50); tf: scaled to [-1, 1]
    (MobileNetV2); unit: scaled to [0, 1] (TF-Hub image modules); raw: unchanged (EfficientNet
    normalises inside the network).
    """

    MODES = ("caffe", "tf", "unit", "raw")

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, images):
        if self.mode == "caffe":
            bgr = ops.flip(images, axis=-1)
            return bgr - ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=images.dtype)
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "unit":
            return images / 255.0
        return images

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@dataclasses.dataclass
class Classifier:
    classifier: keras.Model
    feature_extractor: keras.Model
    head: keras.Model
    base: keras.Model | layers.Layer


def build_base(backbone: str, alpha: float, weights: str | None, image_size: int):
    """Returns (conv base without top, preprocessing mode).

    weights: "imagenet", None (random), or a local path of a Keras .h5 weights file. A backbone
    that is not built in is a TF-Hub/Kaggle handle or SavedModel path of an image feature-vector
    module, loaded through tensorflow_hub and wrapped in keras.layers.TFSMLayer.
    """
    if backbone not in _APPLICATIONS:
        return _hub_base(backbone), "unit"
    application, mode = _APPLICATIONS[backbone]
    kwargs = dict(include_top=False, weights=weights, input_shape=(image_size, image_size, 3))
    if backbone == "mobilenet_v2":
        kwargs["alpha"] = alpha
    base = application(**kwargs)
    base.trainable = False
    return base, mode


def _hub_base(handle: str) -> layers.Layer:
    import tensorflow_hub as hub

    path = hub.resolve(handle)
    # float32 under any policy: a signature's input dtype is fixed when saved, and under
    # mixed_float16 Keras would cast the images to float16, which the signature refuses.
    return HubModule(path, call_endpoint="serving_default", trainable=False, dtype="float32",
                     name="hub_module")


# What a TensorFlow name scope accepts (tf.name_scope raises on anything else).
_NOT_IN_SCOPE_NAMES = re.compile(r"[^A-Za-z0-9_.\-]")


@keras.saving.register_keras_serializable(package="job")
class HubModule(layers.TFSMLayer):
    """A SavedModel's signature as a Keras layer whose weights an optimizer can train.

    TFSMLayer tracks the module's own tf.Variables (the signature reads them, so training them
    trains the module) under their TensorFlow names with "/" replaced, e.g. "Conv1_kernel:0".
    Keras optimizers name each slot variable after its model variable inside a name scope, which
    refuses ":" ("'Conv1_kernel:0_velocity' is not a valid scope name"), so fine-tuning failed at
    its first step. Here the names lose the ":0" output index, which names a tensor, not a
    variable, and any other character a scope refuses: "Conv1/kernel:0" is "Conv1_kernel".

    The signature runs as it was traced (TF-Hub's image modules: in inference mode) whatever
    `training` says, since TFSMLayer switches only to a training endpoint and none is given: the
    module's BatchNormalization keeps its moving statistics while its other weights train.
    """

    def _add_existing_weight(self, weight):
        # Overrides TFSMLayer's (Keras 3.15) only to pass a usable name; the tests fine-tune a
        # module, so a Keras release that stops calling it fails there, not in a user's run.
        name = _NOT_IN_SCOPE_NAMES.sub("_", re.sub(r":\d+$", "", weight.name))
        self._track_variable(keras.Variable(initializer=weight, trainable=weight.trainable,
                                            dtype=weight.dtype, shape=weight.shape, name=name))


def build_classifier(base, preprocess_mode: str, num_classes: int, image_size: int,
                     dense_units: int, dropout: float) -> Classifier:
    """Assembles preprocessing, base, pooling and a new head; two classes give one sigmoid unit."""
    images = keras.Input((image_size, image_size, 3), name="image")
    x = Preprocess(preprocess_mode, name="preprocess")(images)
    # training=False holds only where fit() says nothing: a Keras 3 functional model passes its
    # own training flag to the layers inside. What keeps a fine-tuned base's BatchNormalization in
    # inference mode is unfreeze_from, which leaves those layers frozen.
    x = base(x, training=False)
    if isinstance(x, dict):  # a hub module's serving signature returns a dict of named outputs
        x = next(iter(x.values()))
    features = layers.GlobalAveragePooling2D(name="pool")(x) if len(x.shape) == 4 else x
    head = build_head(features.shape[-1], num_classes, dense_units, dropout)
    outputs = head(features)
    return Classifier(
        classifier=keras.Model(images, outputs, name="classifier"),
        feature_extractor=keras.Model(images, features, name="feature_extractor"),
        head=head,
        base=base,
    )


def build_head(feature_dim: int, num_classes: int, dense_units: int, dropout: float) -> keras.Model:
    """Dropout + output, with a hidden Dense layer of dense_units before them unless it is 0 (a
    linear head, which phase 1 solves as a linear probe); the output stays float32 under mixed
    precision."""
    binary = num_classes == 2
    features = keras.Input((feature_dim,), name="features")
    x = layers.Dense(dense_units, activation="relu", name="dense")(features) if dense_units else features
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(1 if binary else num_classes,
                           activation="sigmoid" if binary else "softmax",
                           dtype="float32", name="probabilities")(x)
    return keras.Model(features, outputs, name="head")


def build_augmentation(seed: int) -> keras.Sequential:
    """Random flip, rotation, zoom, translation, brightness and contrast; active in training only.

    Zoom reaches 30 % in and 10 % out, height and width drawn apart: how tightly an image is
    framed, and its aspect ratio, vary with the site and the operator, and a classifier that has
    only seen one framing learns it as a cue for its class."""
    return keras.Sequential([
        layers.RandomFlip("horizontal", seed=seed),
        layers.RandomRotation(0.05, seed=seed),
        layers.RandomZoom((-0.3, 0.1), (-0.3, 0.1), seed=seed),
        layers.RandomTranslation(0.1, 0.1, seed=seed),
        layers.RandomBrightness(0.1, seed=seed),
        layers.RandomContrast(0.2, seed=seed),
    ], name="augmentation")


def with_augmentation(classifier: keras.Model, augmentation: keras.Sequential) -> keras.Model:
    """A training-only wrapper: augmentation in front of the deployable classifier."""
    images = keras.Input(classifier.input_shape[1:], name="image")
    return keras.Model(images, classifier(augmentation(images)), name="augmented_classifier")


def unfreeze_from(base: keras.Model, layer_name: str) -> None:
    """Makes the layers from layer_name to the top trainable; BatchNormalization stays frozen, so
    it keeps its pretrained statistics (Keras runs a frozen BatchNormalization in inference mode).
    Training from scratch makes the whole base trainable instead: its statistics are learnt."""
    names = [layer.name for layer in base.layers]
    start = names.index(layer_name)
    base.trainable = True
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= start and not isinstance(layer, layers.BatchNormalization)


def make_trainable_from_scratch(base: keras.Model) -> None:
    """Makes every layer trainable, BatchNormalization too, with its moving statistics averaged
    at momentum 0.9: the Keras applications' 0.999 (MobileNetV2's) is a pretrained network's
    setting, and from random weights its moving averages still held their starting values after
    5 epochs of 19 steps, so validation scored every image alike (intel_scenes: chance, 0.167,
    while training accuracy rose to 0.38)."""
    base.trainable = True
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = 0.9


def split_for_fine_tuning(parts: Classifier, layer_name: str
                          ) -> tuple[keras.Model, keras.Model, keras.Model]:
    """Cuts the classifier where fine-tuning starts: (frozen bottom, upper features, trainable top).

    bottom maps images to the input of layer_name; upper maps that to the pooled features that
    the head takes (so phase 1 can reuse phase 2's bottom outputs); top maps it to probabilities
    through the unfrozen layers, the pooling and the head. All share their layers (and weights)
    with parts.classifier, so training top trains the classifier.
    """
    cut = parts.base.get_layer(layer_name).input
    base_bottom = keras.Model(parts.base.input, cut, name="base_bottom")
    base_top = keras.Model(cut, parts.base.output, name="base_top")
    images = parts.classifier.inputs[0]
    preprocess = parts.classifier.get_layer("preprocess")
    bottom = keras.Model(images, base_bottom(preprocess(images), training=False), name="bottom")
    activations = keras.Input(cut.shape[1:], name="activations")
    features = parts.classifier.get_layer("pool")(base_top(activations, training=False))
    upper = keras.Model(activations, features, name="upper")
    top = keras.Model(activations, parts.head(features), name="top")
    return bottom, upper, top


def base_layer_names(backbone: str, alpha: float, image_size: int) -> list[str]:
    """Layer names of a built-in backbone, from its architecture alone (no weights are loaded)."""
    base, _ = build_base(backbone, alpha, None, image_size)
    return [layer.name for layer in base.layers]


def loss_and_metrics(num_classes: int, label_smoothing: float):
    """Cross-entropy whose targets are moved label_smoothing of the way towards uniform."""
    if num_classes == 2:
        return (keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
                [keras.metrics.BinaryAccuracy(name="accuracy")])
    return (SparseCategoricalCrossentropy(num_classes, label_smoothing),
            [keras.metrics.SparseCategoricalAccuracy(name="accuracy")])


@keras.saving.register_keras_serializable(package="job")
class SparseCategoricalCrossentropy(keras.losses.Loss):
    """Keras's categorical cross-entropy, label smoothing included, on integer labels (Keras's own
    SparseCategoricalCrossentropy has no label smoothing)."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0,
                 name: str = "sparse_categorical_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes, self.label_smoothing = num_classes, label_smoothing

    def call(self, y_true, y_pred):
        one_hot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), self.num_classes)
        return keras.losses.categorical_crossentropy(one_hot, y_pred,
                                                     label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "label_smoothing": self.label_smoothing}


def parameter_counts(model: keras.Model) -> dict[str, int]:
    trainable = sum(int(ops.size(w)) for w in model.trainable_weights)
    frozen = sum(int(ops.size(w)) for w in model.non_trainable_weights)
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}


def summary(model: keras.Model) -> dict:
    """Keras' summary of the model as text, and its parameter counts."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=100)
    return {"text": "\n".join(lines), "parameters": parameter_counts(model)}
