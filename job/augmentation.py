"""Augmentation: the random views of the training images, as Keras layers active in training only.

Flip, rotation, zoom, translation, brightness and contrast; the first four applied as one
resampling of each image (RandomReframing) rather than four.
"""
from __future__ import annotations

import keras
from keras import layers, ops

ROTATION = 0.05  # of a full turn, either way
# Zoom reaches 30 % in and 10 % out, height and width drawn apart: how tightly an image is framed,
# and its aspect ratio, vary with the site and the operator, and a classifier that has only seen
# one framing learns it as a cue for its class.
ZOOM = (-0.3, 0.1)
TRANSLATION = 0.1  # of the height and of the width
BRIGHTNESS = 0.1  # of the 0-255 range, either way
CONTRAST = 0.2


def build_augmentation(seed: int) -> keras.Sequential:
    """Random reframing (horizontal flip, rotation, zoom, translation), brightness and contrast."""
    return keras.Sequential([
        RandomReframing(seed=seed),
        layers.RandomBrightness(BRIGHTNESS, seed=seed),
        layers.RandomContrast(CONTRAST, seed=seed),
    ], name="augmentation")


class RandomReframing(layers.Layer):
    """RandomFlip (horizontal), RandomRotation, RandomZoom and RandomTranslation, in that order,
    resampling the image once.

    Written here because Keras has no layer that composes them: chained, each of the four
    resamples the whole image, and together they cost more than MobileNetV2 0.5 itself on a CPU
    (bench/speed.py --only augmentation). This layer lets those four layers draw exactly what
    they draw in a chain, from their own seeds, and applies the product of their transforms in
    one bilinear resampling with the same reflected border; the views differ from the chain's
    only by two fewer interpolations (less blur) and by where a border is reflected.
    """

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.flip = layers.RandomFlip("horizontal", seed=seed)
        self.rotation = layers.RandomRotation(ROTATION, seed=seed)
        self.zoom = layers.RandomZoom(ZOOM, ZOOM, seed=seed)
        self.translation = layers.RandomTranslation(TRANSLATION, TRANSLATION, seed=seed)

    def call(self, images, training=True):
        if not training:
            return images
        images = ops.cast(images, self.compute_dtype)
        transform = self._flip_matrix(images)
        for matrix in (self._rotation_matrix, self._zoom_matrix, self._translation_matrix):
            transform = ops.matmul(transform, matrix(images))
        return keras.ops.image.affine_transform(
            images, ops.reshape(transform, (-1, 9))[:, :8], interpolation="bilinear",
            fill_mode="reflect")

    def build(self, input_shape):
        for layer in (self.flip, self.rotation, self.zoom, self.translation):
            layer.build(input_shape)

    # Each matrix maps a pixel of the output to where it is read in the input, as
    # keras.ops.image.affine_transform takes it, so the chain flip -> rotation -> zoom ->
    # translation reads at flip @ rotation @ zoom @ translation.
    def _flip_matrix(self, images):
        flips = ops.cast(ops.reshape(self.flip.get_random_transformation(images)["flips"], (-1,)),
                         "float32")  # 1 where the image is mirrored
        width = ops.cast(ops.shape(images)[2], "float32")
        ones, zeros = ops.ones_like(flips), ops.zeros_like(flips)
        return _square(ops.stack([1 - 2 * flips, zeros, flips * (width - 1), zeros, ones, zeros,
                                  zeros, zeros], axis=1))

    def _rotation_matrix(self, images):
        drawn = self.rotation.get_random_transformation(images, training=True)
        return _square(drawn["rotation_matrix"])

    def _zoom_matrix(self, images):
        drawn = self.zoom.get_random_transformation(images, training=True)
        zoom_x, zoom_y = drawn["width_zoom"][:, 0], drawn["height_zoom"][:, 0]
        height, width = (ops.cast(size, "float32") for size in ops.shape(images)[1:3])
        zeros = ops.zeros_like(zoom_x)
        return _square(ops.stack([zoom_x, zeros, (width - 1) / 2 * (1 - zoom_x),
                                  zeros, zoom_y, (height - 1) / 2 * (1 - zoom_y),
                                  zeros, zeros], axis=1))

    def _translation_matrix(self, images):
        shift = self.translation.get_random_transformation(images, training=True)["translations"]
        ones, zeros = ops.ones_like(shift[:, 0]), ops.zeros_like(shift[:, 0])
        return _square(ops.stack([ones, zeros, -shift[:, 0], zeros, ones, -shift[:, 1],
                                  zeros, zeros], axis=1))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def _square(transforms):
    """(batch, 8) transforms, as affine_transform takes them, as (batch, 3, 3) matrices."""
    transforms = ops.cast(transforms, "float32")
    return ops.reshape(ops.concatenate([transforms, ops.ones_like(transforms[:, :1])], axis=1),
                       (-1, 3, 3))
