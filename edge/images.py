"""Images: decode any image file into a fixed-size RGB array with Pillow, within a memory budget.

Training (job/inputs/data.py), the export's calibration and parity images, and the edge predictor all
call `load_image`, so a deployed model sees pixels prepared exactly as in training. Every decode in the process shares one budget of decoded bytes
(`DECODE_BUDGET_BYTES`), so parallel decoding cannot exhaust memory whatever the images are.
This module needs only numpy and Pillow (no TensorFlow).
"""
from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
from PIL import Image, ImageMode, ImageOps

MAX_PIXELS = 150_000_000  # a 10000x10000 scan decodes; a decompression bomb does not
Image.MAX_IMAGE_PIXELS = None  # we enforce MAX_PIXELS ourselves, with a clear reason
DECODE_BUDGET_BYTES = 512 * 2**20
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # 16-bit and 32-bit grayscale


class ImageError(Exception):
    """A file that is not a usable image; the message is the reason it was skipped."""


class DecodeBudget:
    """Bytes of image memory that the decodes running at once may hold between them.

    It exists because a file's size says nothing about its decoded size (a 140 KB PNG can decode
    to 144 MB) and images are decoded in parallel (the file check's threads, tf.data's parallel
    map): without it, a handful of small files decoding together exhausted memory. A decode
    larger than the whole budget waits until no other decode holds any of it, then runs alone.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._in_use = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, size: int):
        size = min(size, self.capacity)  # a larger decode takes all of it, so it runs alone
        with self._changed:
            self._changed.wait_for(lambda: self._in_use + size <= self.capacity)
            self._in_use += size
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= size
                self._changed.notify_all()


_DECODES = DecodeBudget(DECODE_BUDGET_BYTES)

if "PILLOW_BLOCK_SIZE" not in os.environ:
    # Pillow allocates images in 16 MB blocks, which glibc serves from per-thread arenas that keep
    # freed memory: each decoding thread then held on to the largest image it had decoded, and
    # the budget above stopped bounding memory. Blocks over 32 MB are mapped and unmapped
    # directly, so they go back to the system as soon as an image is freed.
    Image.core.set_block_size(64 * 2**20)


def load_image(path: str, size: int) -> np.ndarray:
    """Returns the image at path as a (size, size, 3) uint8 RGB array, resized bilinearly.

    Grayscale, palette, alpha, CMYK and 16-bit images are all converted to 8-bit RGB (alpha is
    dropped). Raises ImageError with the reason when the file cannot be used.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"too large: {width}x{height} pixels (limit {MAX_PIXELS:,})")
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
            with _DECODES.reserve(_decode_bytes(image)):
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when upright
                return _resized_rgb(image, size)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unknown format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(f"unreadable image: {error}") from None


def load_images(paths: list[str], size: int) -> np.ndarray:
    """The images at paths as one float32 (n, size, size, 3) batch of RGB 0-255, the models' input.
    Raises ImageError for the first file that cannot be used."""
    return np.stack([load_image(path, size) for path in paths]).astype(np.float32)


def _decode_bytes(image: Image.Image) -> int:
    """The most memory `load_image` holds at once for this opened, not yet loaded image (at its
    drafted size): the decoded pixels twice (an EXIF rotation makes a copy) plus the full-size
    working copies that converting its mode makes before resizing."""
    pixels = image.width * image.height
    mode = ImageMode.getmode(image.mode)
    # Pillow keeps every multi-band pixel in 4 bytes (RGB too); one band in its sample size.
    stored = 4 if len(mode.bands) > 1 else int(mode.typestr[-1])
    if image.mode in ("L", "RGB"):
        working = 0  # resized before any conversion
    elif image.mode in HIGH_DEPTH_MODES:
        working = 4 + 4 + 1 + 1  # float32 values, the raw bytes numpy reads them from, uint8, L
    else:
        working = 4  # the full-size RGB copy
    return pixels * (2 * stored + working)


def _resized_rgb(image: Image.Image, size: int) -> np.ndarray:
    if image.mode in HIGH_DEPTH_MODES:
        image = _to_8bit_gray(image)
    if image.mode not in ("L", "RGB"):
        # Converted first: resizing these is not the same before conversion (palette and bilevel
        # images resize by nearest neighbour, alpha is premultiplied, CMYK converts non-linearly).
        image = image.convert("RGB")
    # Resizing first keeps memory small; it gives the same pixels, since converting L to RGB
    # copies the gray value into each band and bilinear resizing treats every band alike.
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized.convert("RGB"), dtype=np.uint8)


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale scaled from its full range to 0-255, instead of clipped at 255."""
    values = np.array(image, dtype=np.float32)  # a writable copy, even of a float image
    peak = 65535.0 if values.max(initial=0) > 255 else 255.0
    values *= 255.0 / peak  # in place: one full-size float copy, not three
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8), "L")
