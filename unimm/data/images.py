"""Image loading and Harmon's preprocessing: pad to a gray square, resize, scale to [-1, 1].

Pure numpy + PIL; imports nothing from unimm.models or unimm.train.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

PAD_COLOR = (127, 127, 127)   # Harmon's expand2square background
MIN_SIDE = 8                  # smaller images are almost certainly broken thumbnails


def load_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB; any PIL mode (L, LA, P, RGBA, CMYK, ...) is converted."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()   # decode now so truncated files fail here, not later
            if img.mode == "P":
                # Palette images may carry transparency; going through RGBA avoids PIL's warning.
                img = img.convert("RGBA")
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e
    arr = np.asarray(img, np.uint8)
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


def to_model(img: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], the models' pixel range."""
    return np.asarray(img, np.float32) / 127.5 - 1.0
