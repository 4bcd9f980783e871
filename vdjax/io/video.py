"""Videos on disk: mp4 (H.264 through imageio-ffmpeg), gif, or a folder of PNG frames; and reading them back.

Frames are uint8 `(frames, height, width, 3)`. `check_output(path)` is called before any compute, so that a bad
path fails in a second, not after sampling.
"""
from __future__ import annotations

import os

import numpy as np

WRITABLE = (".mp4", ".gif")


def check_output(path: str) -> str:
    """'mp4' | 'gif' | 'frames' (a folder, written as PNGs) for `path`, or a ValueError saying what works."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    parent = os.path.dirname(os.path.abspath(path))
    if ext and ext not in WRITABLE:
        raise ValueError(f"{path}: cannot write {ext!r} videos; use .mp4, .gif, or a folder name (PNG frames)")
    if not os.path.isdir(parent):
        raise ValueError(f"{path}: the folder {parent} does not exist; create it first")
    return ext[1:] if ext else "frames"


def to_uint8(frames) -> np.ndarray:
    """Floats in [-1, 1] (the VAE's output) -> uint8 [0, 255]; uint8 passes through."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return np.round(np.clip((frames.astype(np.float32) + 1.0) * 127.5, 0, 255)).astype(np.uint8)


def write_video(frames, path: str, fps: float = 8.0) -> str:
    import imageio.v3 as iio

    kind = check_output(path)
    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (frames, height, width, 3); got shape {frames.shape}")
    if kind == "frames":
        os.makedirs(path, exist_ok=True)
        for i, frame in enumerate(frames):
            iio.imwrite(os.path.join(path, f"{i:04d}.png"), frame)
    elif kind == "gif":
        iio.imwrite(path, frames, duration=1000.0 / fps, loop=0)
    else:
        # H.264 in yuv420p (plays everywhere) wants even sizes.
        h, w = frames.shape[1:3]
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        # macro_block_size=1: keep the size (imageio would otherwise scale it up to a multiple of 16).
        iio.imwrite(path, frames, fps=fps, codec="libx264", plugin="FFMPEG", macro_block_size=1)
    return path


def read_video(path: str) -> np.ndarray:
    """A video file (mp4, gif, ...) or a folder of images (sorted by name) -> uint8 (frames, height, width, 3).
    Grayscale and RGBA frames become RGB; 16-bit frames are scaled to 8 bits."""
    import imageio.v3 as iio

    path = os.fspath(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTS))
        if not names:
            raise ValueError(f"{path}: no {'/'.join(IMAGE_EXTS)} frames in this folder")
        frames = [_rgb(iio.imread(os.path.join(path, n))) for n in names]
        sizes = sorted({f.shape[:2] for f in frames})
        if len(sizes) > 1:
            raise ValueError(f"{path}: frames of different sizes {sizes}; give frames of one size")
        return np.stack(frames)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such video file")
    if path.lower().endswith(IMAGE_EXTS):
        raise ValueError(f"{path} is a single image; give a video (mp4, gif, ...) or a folder of frames")
    try:
        frames = np.asarray(iio.imread(path, index=None))
    except Exception as e:
        raise ValueError(f"{path}: cannot be decoded as a video ({e})") from e
    if frames.ndim not in (3, 4) or len(frames) == 0:
        raise ValueError(f"{path}: decoded to shape {frames.shape}, not frames")
    return np.stack([_rgb(f) for f in frames])


IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def _rgb(frame: np.ndarray) -> np.ndarray:
    """One frame: (H, W), (H, W, 1|3|4), uint8 or 16-bit -> uint8 (H, W, 3)."""
    frame = np.asarray(frame)
    if frame.dtype == np.uint16:
        frame = (frame >> 8).astype(np.uint8)
    elif frame.dtype == bool:
        frame = frame.astype(np.uint8) * 255
    elif frame.dtype != np.uint8:
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.shape[-1] in (1, 2):  # gray, gray + alpha
        frame = np.repeat(frame[..., :1], 3, axis=-1)
    return frame[..., :3]
