"""The classifier: preprocessing inside the model, its head, and what fine-tuning unfreezes."""
import keras
import numpy as np
import pytest

from job.training import model


@pytest.fixture
def float16_policy():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def tiny_vgg16(num_classes=2, size=32):
    base, mode = model.build_base("vgg16", 1.0, None, size)
    return model.build_classifier(base, mode, num_classes, size, dense_units=8, dropout=0.5)


def test_caffe_preprocessing_matches_keras_vgg16():
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = model.Preprocess("caffe")(pixels)
    theirs = keras.applications.vgg16.preprocess_input(pixels.copy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours), theirs, atol=1e-4)


def test_tf_preprocessing_matches_keras_mobilenet_v2():
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = model.Preprocess("tf")(pixels)
    theirs = keras.applications.mobilenet_v2.preprocess_input(pixels.copy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours), theirs, atol=1e-5)


def test_two_classes_give_one_sigmoid_output():
    classifier = tiny_vgg16(2).classifier
    assert classifier.output_shape == (None, 1)
    assert classifier.get_layer("head").get_layer("probabilities").activation.__name__ == "sigmoid"


def test_more_classes_give_a_softmax_row():
    probabilities = tiny_vgg16(4).classifier.predict(np.zeros((3, 32, 32, 3)), verbose=0)
    assert probabilities.shape == (3, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)


def test_classifier_takes_plain_pixels_named_image():
    classifier = tiny_vgg16().classifier
    assert classifier.input_shape == (None, 32, 32, 3)
    assert classifier.inputs[0].name == "image"


def test_base_starts_frozen():
    parts = tiny_vgg16()
    assert parts.base.trainable is False
    assert model.parameter_counts(parts.classifier)["trainable"] == \
        model.parameter_counts(parts.head)["trainable"]


def test_unfreeze_from_makes_only_the_top_block_trainable():
    parts = tiny_vgg16()
    model.unfreeze_from(parts.base, "block5_conv1")
    trainable = [layer.name for layer in parts.base.layers if layer.trainable and layer.weights]
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]


def test_unfreeze_keeps_batch_normalization_frozen():
    base, _ = model.build_base("mobilenet_v2", 0.35, None, 32)
    model.unfreeze_from(base, "block_16_expand")
    unfrozen = {layer.name for layer in base.layers if layer.trainable and layer.weights}
    assert "block_16_expand" in unfrozen and "Conv_1" in unfrozen
    assert "block_16_expand_BN" not in unfrozen and "block_15_expand" not in unfrozen


def test_output_stays_float32_under_mixed_precision(float16_policy):
    parts = tiny_vgg16()
    assert parts.base.layers[1].compute_dtype == "float16"
    assert parts.classifier.output.dtype == "float32"


def test_layer_names_come_from_the_architecture_alone():
    names = model.base_layer_names("resnet50", 1.0, 32)
    assert "conv5_block1_1_conv" in names


@pytest.mark.parametrize("backbone, layer", [("vgg16", "block5_conv1"),
                                             ("mobilenet_v2", "block_16_expand")])
def test_split_for_fine_tuning_computes_what_the_classifier_computes(backbone, layer):
    base, mode = model.build_base(backbone, 0.35 if backbone == "mobilenet_v2" else 1.0, None, 32)
    parts = model.build_classifier(base, mode, 3, 32, dense_units=8, dropout=0.5)
    bottom, upper, top = model.split_for_fine_tuning(parts, layer)
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    activations = bottom.predict(pixels, verbose=0)
    np.testing.assert_array_equal(top.predict(activations, verbose=0),
                                  parts.classifier.predict(pixels, verbose=0))
    np.testing.assert_allclose(upper.predict(activations, verbose=0),
                               parts.feature_extractor.predict(pixels, verbose=0), rtol=1e-5, atol=1e-6)
    model.unfreeze_from(base, layer)
    top_weights = {id(w) for w in top.trainable_weights}
    assert top_weights == {id(w) for w in parts.classifier.trainable_weights}


def test_augmentation_reframes_training_images_within_the_pixel_range():
    """Augmented views keep shape and the 0-255 range and each differs from its image;
    inference leaves images alone."""
    rows = np.linspace(0, 255, 64, dtype="float32")
    images = np.broadcast_to(rows[None, :, None, None], (8, 64, 64, 3)).copy()  # a vertical ramp
    augmentation = model.build_augmentation(seed=1)
    views = keras.ops.convert_to_numpy(augmentation(images, training=True))
    assert views.shape == images.shape
    assert views.min() >= 0 and views.max() <= 255
    assert np.abs(views - images).mean(axis=(1, 2, 3)).min() > 1  # every view differs
    unchanged = keras.ops.convert_to_numpy(augmentation(images, training=False))
    np.testing.assert_array_equal(unchanged, images)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_label_smoothing_moves_targets_towards_uniform(num_classes):
    """Without smoothing the loss is plain cross-entropy; with 0.2 a confident right answer costs
    what cross-entropy against targets 0.2 of the way to uniform costs."""
    probabilities = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]], "float32")[:, :num_classes]
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    labels = np.array([0, 1])
    one_hot = np.eye(num_classes)[labels]
    if num_classes == 2:  # one sigmoid unit: the probability of the second class
        probabilities, one_hot = probabilities[:, 1:], one_hot[:, 1:]

    def cross_entropy(targets):
        if num_classes == 2:
            return np.mean(-(targets * np.log(probabilities)
                             + (1 - targets) * np.log(1 - probabilities)))
        return np.mean(-(targets * np.log(probabilities)).sum(axis=1))

    for smoothing in (0.0, 0.2):
        loss, _ = model.loss_and_metrics(num_classes, smoothing)
        uniform = 0.5 if num_classes == 2 else 1 / num_classes
        expected = cross_entropy(one_hot * (1 - smoothing) + uniform * smoothing)
        assert float(loss(labels, probabilities)) == pytest.approx(expected, rel=1e-4)


def test_multiclass_loss_survives_a_save_and_load(tmp_path):
    classifier = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    classifier.compile(loss=model.loss_and_metrics(3, 0.1)[0])
    classifier.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.loss.get_config()["label_smoothing"] == 0.1


@pytest.mark.slow  # trains
@pytest.mark.parametrize("from_scratch", [True, False])
def test_batch_normalization_learns_statistics_from_scratch_and_keeps_them_when_fine_tuned(
        from_scratch):
    base, mode = model.build_base("mobilenet_v2", 0.35, None, 32)
    if from_scratch:
        model.make_trainable_from_scratch(base)  # what job.training.phases does for WEIGHTS=none
    else:
        model.unfreeze_from(base, "block_13_expand")
    parts = model.build_classifier(base, mode, 2, 32, dense_units=0, dropout=0.0)
    parts.classifier.compile(optimizer="sgd", loss="binary_crossentropy")
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    parts.classifier.fit(images, np.array([0, 1] * 4), epochs=1, verbose=0)
    moving_mean = base.get_layer("block_16_project_BN").moving_mean.numpy()
    assert (np.abs(moving_mean).max() > 0) == from_scratch  # Keras starts it at zeros
