"""Subject masks in: read a mask file, fit it to the frame size, and cut the subject out of an image (MagDiff's SDA).

White (or any value above one half) is the subject. Masks of another size than the frame are fitted as images are
(centred crop to the aspect ratio, resize; with a log line), then thresholded at 0.5, so a soft or anti-aliased
mask becomes binary.
"""
from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)


VIDEO_EXTS = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")


def read_mask(path: str) -> np.ndarray:
    """A mask image file (any mode: L, RGB, RGBA, 1, 16-bit) -> float32 (H, W) in [0, 1]; a folder of mask frames
    or a mask video (mp4, animated gif, ...) -> float32 (F, H, W), one mask per frame (a one-frame gif: (H, W))."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if os.path.isdir(path) or (os.path.isfile(path) and path.lower().endswith(VIDEO_EXTS)):
        from vdjax.io.video import read_video

        masks = read_video(path).astype(np.float32).mean(axis=-1) / 255.0  # per frame (F, H, W)
        return masks[0] if len(masks) == 1 else masks
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such mask file")
    try:
        with Image.open(path) as image:
            if image.mode in ("I", "I;16", "F"):
                data = np.asarray(image, np.float32)
                return data / max(float(data.max()), 1.0)
            return np.asarray(image.convert("L"), np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable mask image ({e}); give a PNG with the subject in white") from None


def _as_float(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask.astype(np.float32)
    if np.issubdtype(mask.dtype, np.integer):
        return mask.astype(np.float32) / (255.0 if mask.max(initial=0) > 1 else 1.0)
    return mask.astype(np.float32)


def fit_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) or (F, H, W) mask (bool, {0, 1}, uint8 0..255 or float in [0, 1]) -> bool (..., height, width): fitted
    like `fit_image` (centred crop to the aspect ratio, bilinear resize; a log line) and thresholded at 0.5. An empty
    mask (every frame empty, for one per frame) is refused: no subject."""
    mask = _as_float(mask)
    if mask.ndim == 3 and mask.shape[-1] in (1, 3, 4) and mask.shape[0] > 4:  # (H, W, C): its first channel
        mask = mask[..., 0]
    if mask.ndim not in (2, 3):
        raise ValueError(f"a mask is (H, W) or (frames, H, W); got shape {mask.shape}")
    h, w = mask.shape[-2:]
    if (h, w) != (height, width):
        log.warning("mask %dx%d fitted to the frame size %dx%d (centred crop to the aspect ratio, resize)", w, h,
                    width, height)
    if mask.ndim == 3:  # per frame: frames without the subject (it left, or is hidden) are allowed, not all of them
        fitted = np.stack([_fit_one(m, height, width) for m in mask])
        empty = [i for i, m in enumerate(fitted) if not m.any()]
        if len(empty) == len(fitted):
            raise ValueError(f"the mask is empty: no subject in any of its {len(fitted)} frames (no pixel above 0.5 "
                             "after fitting to the frame); give masks with the subject in white on black")
        if empty:
            log.warning("mask frames %s have no subject", empty)
        return fitted
    fitted = _fit_one(mask, height, width)
    if not fitted.any():
        raise ValueError("the mask is empty: no subject (no pixel above 0.5 after fitting to the frame); give a "
                         "mask with the subject in white on black")
    return fitted


def _fit_one(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    h, w = mask.shape
    if (h, w) != (height, width):
        crop_h, crop_w = min(h, round(w * height / width)), min(w, round(h * width / height))
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        crop = Image.fromarray(mask[top:top + crop_h, left:left + crop_w])
        mask = np.asarray(crop.resize((width, height), Image.BILINEAR), np.float32)
    return mask > 0.5


def subject_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) image and bool (H, W) mask -> uint8 (H, W, 3): the subject, black elsewhere."""
    image, mask = np.asarray(image), np.asarray(mask, bool)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size; fit both to the frame size "
                         "(fit_image, fit_mask)")
    return np.where(mask[..., None], image, 0).astype(np.uint8)
