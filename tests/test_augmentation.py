"""The training augmentation (job/augmentation.py): random views within the pixel range, and a
reframing that draws and places what Keras's flip, rotation, zoom and translation layers would."""
import keras
import numpy as np
from keras import layers

from job import augmentation


def test_augmentation_reframes_training_images_within_the_pixel_range():
    """Augmented views keep shape and the 0-255 range and each differs from its image;
    inference leaves images alone."""
    rows = np.linspace(0, 255, 64, dtype="float32")
    images = np.broadcast_to(rows[None, :, None, None], (8, 64, 64, 3)).copy()  # a vertical ramp
    views = augmentation.build_augmentation(seed=1)
    augmented = keras.ops.convert_to_numpy(views(images, training=True))
    assert augmented.shape == images.shape
    assert augmented.min() >= 0 and augmented.max() <= 255
    assert np.abs(augmented - images).mean(axis=(1, 2, 3)).min() > 1  # every view differs
    unchanged = keras.ops.convert_to_numpy(views(images, training=False))
    np.testing.assert_array_equal(unchanged, images)


def test_one_reframing_reads_where_the_chain_of_keras_layers_reads():
    """On a linear ramp, which bilinear interpolation reproduces exactly, one reframing and the
    chain RandomFlip -> RandomRotation -> RandomZoom -> RandomTranslation with the same seed give
    the same views away from the borders (where the chain reflects three times), call after
    call."""
    size = 96
    rows, columns = np.mgrid[0:size, 0:size].astype("float32")
    ramps = np.stack([columns, 2 * rows, rows + columns], axis=-1)[None].repeat(16, axis=0)
    chain = keras.Sequential([
        layers.RandomFlip("horizontal", seed=3),
        layers.RandomRotation(augmentation.ROTATION, seed=3),
        layers.RandomZoom(augmentation.ZOOM, augmentation.ZOOM, seed=3),
        layers.RandomTranslation(augmentation.TRANSLATION, augmentation.TRANSLATION, seed=3)])
    reframing = augmentation.RandomReframing(seed=3)
    centre = slice(size // 4, 3 * size // 4)
    for _ in range(2):
        expected = keras.ops.convert_to_numpy(chain(ramps, training=True))
        views = keras.ops.convert_to_numpy(reframing(ramps, training=True))
        np.testing.assert_allclose(views[:, centre, centre], expected[:, centre, centre], atol=1e-3)
        assert np.abs(views - ramps).mean() > 1  # and they were moved
