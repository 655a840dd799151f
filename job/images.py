"""Images: decode any image file into a fixed-size RGB array with Pillow.

Training and the edge predictor both call `load_image`, so a deployed model sees pixels prepared
exactly as in training. This module needs only numpy and Pillow (no TensorFlow).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 150_000_000  # a 10000x10000 scan decodes; a decompression bomb does not
Image.MAX_IMAGE_PIXELS = None  # we enforce MAX_PIXELS ourselves, with a clear reason


class ImageError(Exception):
    """A file that is not a usable image; the message is the reason it was skipped."""


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
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
            return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
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


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float grayscale: scale the full range to 0-255 instead of clipping at 255.
        values = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")
