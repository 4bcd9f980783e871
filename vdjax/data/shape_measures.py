"""What a moving_shapes video shows, measured: which shapes (by palette colour), where, and whether they move.

A pixel belongs to a shape of colour c when it is within `tolerance` (Euclidean RGB distance) of c, the nearest of
moving_shapes' palette colours (`COLOURS`); the textured backgrounds (channels 20-130) are never that close. A shape
is a connected component (8-connectivity) of one colour's mask with at least `min_pixels` pixels. From these:

- `psnr(a, b)`: peak signal-to-noise ratio of two uint8 images, in dB.
- `displacement(video)`: per colour present in frame 0 and in the last frame, the distance in pixels between the
  centroids of its mask there; their mean (0 for a video that does not move).
- `consistency(video)`: the fraction of frames whose shapes (the count of components per colour) equal frame 0's;
  a video whose shapes vanish, split, merge or change colour scores low.
- `direction_agreement(video, reference)`: whether the shapes move the way the true clip's do (which only the
  caption tells an image-to-video model): per colour, the cosine between the two videos' centroid shifts from
  frame 0 to an early frame; their mean (1: the true directions, 0: unrelated, -1: reversed).

The demo's tests (tests/test_demo.py) state their thresholds on these.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from vdjax.data.moving_shapes import COLOURS

PALETTE = np.asarray(list(COLOURS.values()), np.float32)  # (colours, 3)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def colour_masks(frame: np.ndarray, tolerance: float = 60.0) -> np.ndarray:
    """uint8 (H, W, 3) -> bool (colours, H, W): the pixels nearest to each palette colour, within `tolerance`."""
    distance = np.linalg.norm(frame.astype(np.float32)[None] - PALETTE[:, None, None], axis=-1)
    nearest = distance.argmin(0)
    return (np.arange(len(PALETTE))[:, None, None] == nearest[None]) & (distance.min(0) <= tolerance)[None]


def shapes(frame: np.ndarray, min_pixels: int = 3) -> tuple[int, ...]:
    """The number of shapes of each palette colour in a frame (connected components of at least min_pixels)."""
    counts = []
    for mask in colour_masks(frame):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        counts.append(int((sizes >= min_pixels).sum()))
    return tuple(counts)


def subject_mask(frame: np.ndarray) -> np.ndarray:
    """bool (H, W): every shape pixel, whatever its colour."""
    return colour_masks(frame).any(0)


def _shifts(video: np.ndarray, frame: int, min_pixels: int) -> dict[int, np.ndarray]:
    """colour -> its mask's centroid shift (dy, dx) from frame 0 to `frame`, for the colours present in both."""
    first, later = colour_masks(video[0]), colour_masks(video[frame])
    return {c: np.argwhere(b).mean(0) - np.argwhere(a).mean(0) for c, (a, b) in enumerate(zip(first, later))
            if a.sum() >= min_pixels and b.sum() >= min_pixels}


def displacement(video: np.ndarray, min_pixels: int = 3) -> float:
    """Mean over the colours present at both ends of the centroid shift (pixels) from frame 0 to the last frame."""
    shifts = _shifts(video, -1, min_pixels)
    return float(np.mean([np.linalg.norm(v) for v in shifts.values()])) if shifts else 0.0


def direction_agreement(video: np.ndarray, reference: np.ndarray, frame: int = 3, min_pixels: int = 3,
                        min_shift: float = 1.0) -> float:
    """Mean over colours of cos(shift in `video`, shift in `reference`), the shifts from frame 0 to `frame` (early,
    so that few shapes have bounced off a border yet), over the colours that move at least `min_shift` pixels in
    both. NaN where no colour does (a still video has no direction)."""
    ours, true = _shifts(video, frame, min_pixels), _shifts(reference, frame, min_pixels)
    cosines = [ours[c] @ true[c] / (np.linalg.norm(ours[c]) * np.linalg.norm(true[c])) for c in ours.keys() & true
               if min(np.linalg.norm(ours[c]), np.linalg.norm(true[c])) >= min_shift]
    return float(np.mean(cosines)) if cosines else float("nan")


def consistency(video: np.ndarray) -> float:
    """The fraction of frames (after the first) with the same shapes, by colour and count, as frame 0."""
    reference = shapes(video[0])
    return float(np.mean([shapes(frame) == reference for frame in video[1:]]))
