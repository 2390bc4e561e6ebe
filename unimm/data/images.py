"""Image loading and Harmon's preprocessing: square (gray padding, or a crop), resize, scale
to [-1, 1].

Pure numpy + PIL; imports nothing from unimm.models or unimm.train.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

PAD_COLOR = (127, 127, 127)   # Harmon's expand2square background
MIN_SIDE = 8                  # smaller images are almost certainly broken thumbnails


def _high_depth_to_rgb(img: Image.Image, path: str) -> np.ndarray:
    """16-bit (``I;16*``) and 32-bit integer (``I``, how some PIL versions open 16-bit PNGs)
    greyscale -> uint8 RGB, scaled (PIL's own conversion clips at 255: a white image)."""
    arr = np.asarray(img).astype(np.int64)
    if arr.min() < 0 or arr.max() > 65535:
        raise ValueError(f"image {path} has mode {img.mode} with values outside 0..65535; expected an "
                         "8-bit or 16-bit image")
    if img.mode.startswith("I;16") or arr.max() > 255:
        arr = (arr * 255 + 32767) // 65535
    return np.repeat(arr.astype(np.uint8)[..., None], 3, axis=-1)


def load_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB; any 8-bit PIL mode (L, LA, P, RGBA, CMYK, ...) is converted and
    16-bit greyscale is scaled to 8 bits. Errors name the file and what is expected."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"image path {path} is not a file; expected an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as img:
            img.load()   # decode now so truncated files fail here, not later
            if img.mode in ("F", "I;32", "I;32B", "I;32L"):
                raise ValueError(f"image {path} has mode {img.mode} (32-bit samples); expected an 8-bit "
                                 "or 16-bit image")
            if img.mode == "I" or img.mode.startswith("I;16"):
                arr = _high_depth_to_rgb(img, path)
            else:
                if img.mode == "P":
                    # Palette images may carry transparency; going through RGBA avoids PIL's warning.
                    img = img.convert("RGBA")
                arr = np.asarray(img.convert("RGB"), np.uint8)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large to decode safely: {str(e).rstrip('.')}; expected "
                         f"at most {2 * Image.MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode image {path}: {e}; expected an image file (PNG, JPEG, ...)") from e
    except ValueError as e:
        if str(e).startswith(f"image {path}"):
            raise
        raise ValueError(f"cannot decode image {path}: {e}") from e
    if min(arr.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image {path} is too small: {arr.shape[1]}x{arr.shape[0]} px "
                         f"(need at least {MIN_SIDE} px per side)")
    return arr


def square_and_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre the image on a (127,127,127) square (as Harmon), then bicubic-resize to size."""
    img = np.asarray(img, np.uint8)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got shape {img.shape}")
    h, w = img.shape[:2]
    if h == w == size:
        return img
    side = max(h, w)
    if h != w:
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[:] = PAD_COLOR
        y0, x0 = (side - h) // 2, (side - w) // 2
        canvas[y0:y0 + h, x0:x0 + w] = img
        img = canvas
    if side == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC), np.uint8)


SQUARE_MODES = ("pad", "random_crop", "center_crop", "stretch")


def to_square(img: np.ndarray, size: int, mode: str = "pad",
              rng: np.random.Generator | None = None) -> np.ndarray:
    """``size`` x ``size`` uint8: ``mode`` "pad" (:func:`square_and_resize`), or a square of
    side ``min(H, W)`` cut from the longer side — "random_crop" at a uniform integer offset
    drawn from ``rng`` (Harmon's ``crop2square``), "center_crop" in the middle — then a
    bicubic resize (PIL's default, as Harmon's ``image.resize``); or "stretch": the whole
    image resized to the square, its aspect ratio lost (RecA's reconstruction data)."""
    if mode == "pad":
        return square_and_resize(img, size)
    if mode == "stretch":
        img = np.asarray(img, np.uint8)
        if img.shape[:2] == (size, size):
            return img
        return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC), np.uint8)
    if mode not in SQUARE_MODES:
        raise ValueError(f"unknown square mode {mode!r}; expected one of {SQUARE_MODES}")
    img = np.asarray(img, np.uint8)
    h, w = img.shape[:2]
    side, free = min(h, w), abs(h - w)
    if mode == "random_crop":
        if rng is None:
            raise ValueError("to_square: 'random_crop' needs an rng")
        start = int(rng.integers(free + 1))
    else:
        start = free // 2
    img = img[start:start + side] if h > w else img[:, start:start + side]
    return square_and_resize(img, size)


def to_model(img: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], the models' pixel range."""
    return np.asarray(img, np.float32) / 127.5 - 1.0
