"""Image decoding to fixed-size uint8 RGB, and CLIP normalisation.

Resizing follows BLIP's evaluation transform: a plain bicubic resize of the whole image to
(size, size), no crop, so objects near the borders (and captions that mention them) survive.
"""

from __future__ import annotations

import io
import os
import zlib

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from tldr_jax.data.records import LazyImage

# A truncated file must be an error we can count, not a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# CLIP's per-channel statistics (BLIP uses the same).
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class ImageError(Exception):
    """An image that cannot be used; `reason` is one of records.SKIP_REASONS."""

    reason = "not_an_image"


class MissingImageError(ImageError):
    reason = "missing_image"


class TruncatedImageError(ImageError):
    reason = "truncated_image"


class NotAnImageError(ImageError):
    reason = "not_an_image"


def _to_8bit(img: Image.Image) -> Image.Image:
    """Rescales high-bit-depth grey images (16-bit PNG/TIFF: modes I;16*, I; float: F) to
    8 bits. Pillow's convert("RGB") clips them at 255, which turns them white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.float64)
        a = a / 257.0 if img.mode != "I" or a.max(initial=0) > 255 else a
    elif img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        finite = a[np.isfinite(a)]
        a = np.nan_to_num(a) * (255.0 if finite.size and finite.max() <= 1.0 else 1.0)
    else:
        return img
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _resize(img: Image.Image, size: int) -> np.ndarray:
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _from_array(array: np.ndarray, size: int) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise NotAnImageError(f"array of shape {array.shape} is not an HxWx3 image")
    array = array[..., :3]
    if array.dtype != np.uint8:
        raise NotAnImageError(f"array of dtype {array.dtype}, expected uint8")
    if array.shape[:2] == (size, size):
        return np.ascontiguousarray(array)
    return _resize(Image.fromarray(array), size)


def decode_image(src: str | os.PathLike | bytes | LazyImage | np.ndarray, size: int) -> np.ndarray:
    """Decodes a path, encoded bytes, a `LazyImage` or an array to uint8 (size, size, 3) RGB.

    Raises MissingImageError (no such file, or one that cannot be opened), NotAnImageError
    (Pillow cannot identify the format) or TruncatedImageError (the format was identified
    but its data is cut or corrupt).
    """
    if isinstance(src, np.ndarray):
        return _from_array(src, size)
    if isinstance(src, LazyImage):
        try:
            src = src.read()
        except FileNotFoundError as e:
            raise MissingImageError(f"{e.filename}: {e.strerror}") from e
        except Exception as e:  # a shard cut or changed since it was read, a source error
            raise TruncatedImageError(f"{type(e).__name__}: {e}") from e
    if isinstance(src, bytes | bytearray | memoryview):
        fp = io.BytesIO(src)
        name = "<bytes>"
    else:
        name = os.fspath(src)
        try:
            fp = open(name, "rb")  # noqa: SIM115 (closed by the `with fp` below)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise MissingImageError(f"{name}: {e.strerror}") from e
        except (OSError, ValueError) as e:  # a name too long, a link loop, no permission
            raise MissingImageError(f"{name!r}: cannot open: {e}") from e
    with fp:
        try:
            img = Image.open(fp)
        except UnidentifiedImageError as e:
            raise NotAnImageError(f"{name}: cannot identify image") from e
        except Image.DecompressionBombError as e:
            raise NotAnImageError(f"{name}: {e}") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise TruncatedImageError(f"{name}: {e}") from e
        try:
            # JPEG only: decode at a reduced scale that is still >= size (much faster).
            img.draft("RGB", (size, size))
            img.load()
            img = _to_8bit(img).convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
            raise TruncatedImageError(f"{name}: {e}") from e
    return _resize(img, size)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 (x/255 - MEAN) / STD."""
    return (np.asarray(images, np.float32) / 255.0 - MEAN) / STD


def denormalize(images: np.ndarray) -> np.ndarray:
    """Inverse of `normalize`, rounded and clipped back to uint8 (for PNG grids)."""
    x = (np.asarray(images, np.float32) * STD + MEAN) * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
