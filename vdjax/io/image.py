"""Conditioning images in: read a file, and fit an image to the model's frame size."""
from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB (grayscale replicated, alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e}); give a PNG or JPEG file") from None


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3): grayscale replicated, alpha dropped
    (as PIL's convert('RGB'))."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"image must be uint8 (H, W) grayscale or (H, W, 1|3|4); got {image.dtype} {image.shape} "
                         "(see read_image)")
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def fit_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 image (any of as_rgb's forms) -> float32 (height, width, 3) in [-1, 1]: the largest centred crop of the
    target's aspect ratio, resized (bicubic, antialiased). Upstream VideoCrafter resizes straight to the size
    instead, which stretches images of another aspect ratio; for images of the model's aspect ratio the two agree."""
    from PIL import Image

    image = as_rgb(image)
    h, w = image.shape[:2]
    crop_h, crop_w = min(h, round(w * height / width)), min(w, round(h * width / height))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    crop = Image.fromarray(image[top:top + crop_h, left:left + crop_w])
    if (crop_h, crop_w) != (h, w):
        log.warning("image %dx%d cropped to %dx%d (centre) for the frame's aspect ratio %dx%d", w, h, crop_w, crop_h,
                    width, height)
    if crop.size != (width, height):
        log.info("image resized from %dx%d to the frame size %dx%d (bicubic)", crop.size[0], crop.size[1], width,
                 height)
        crop = crop.resize((width, height), Image.BICUBIC)
    return np.asarray(crop, np.float32) / 127.5 - 1.0
