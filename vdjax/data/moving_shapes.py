"""`moving_shapes`: synthetic clips made on the fly — coloured shapes moving and bouncing over a textured background,
with a caption naming shapes, colours and directions, the first frame, and a per-frame subject mask.

Deterministic: clip `i` of seed `s` is always the same. Sized for tests, demos and notebooks.
`vdjax.data.tfds_builders.MovingShapesBuilder` prepares the same clips as a TFDS dataset (array_record).
"""
from __future__ import annotations

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40),
           "purple": (150, 60, 200), "white": (245, 245, 245)}
SHAPES = ("square", "circle", "triangle")
MOTIONS = ("random", "by_kind")
# motion='by_kind': each kind's own velocity (dy, dx) in frame sizes per frame, so that where a shape goes can be read
# from the first frame alone (a tiny image-to-video model learns that; it hardly learns to read directions from text)
KIND_VELOCITY = {"square": (0.0, 0.04), "circle": (0.04, 0.0), "triangle": (0.0, -0.04)}


def _check_motion(motion: str) -> None:
    if motion not in MOTIONS:
        raise ValueError(f"motion={motion!r}; choose one of {', '.join(MOTIONS)}")


def _direction(v) -> str:
    horizontal = "right" if v[1] > 0 else "left"
    vertical = "down" if v[0] > 0 else "up"
    return horizontal if abs(v[1]) >= abs(v[0]) else vertical


def _shape_mask(kind: str, centre, radius: float, size: int) -> np.ndarray:
    y, x = np.mgrid[:size, :size].astype(np.float32) + 0.5
    dy, dx = y - centre[0], x - centre[1]
    if kind == "square":
        return (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
    if kind == "circle":
        return dy ** 2 + dx ** 2 <= radius ** 2
    return (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) / 2)  # triangle, apex up


def make_clip(index: int, *, num_frames: int = 16, size: int = 64, seed: int = 0, motion: str = "random") -> dict:
    """motion: 'random' (each shape's direction and speed drawn: only the caption says which way it goes) or
    'by_kind' (squares move right, circles down, triangles left, all at 0.04 frame sizes per frame; the same first
    frame as 'random')."""
    _check_motion(motion)
    rng = np.random.default_rng([seed, index])
    # Background: two smooth colour gradients plus faint stripes, so the model has texture to keep still.
    y, x = np.mgrid[:size, :size].astype(np.float32) / size
    c0, c1 = rng.uniform(30, 120, 3), rng.uniform(30, 120, 3)
    stripes = 10 * np.sin(2 * np.pi * (x * rng.uniform(2, 5) + y * rng.uniform(1, 3)))[..., None]
    background = (c0 * (1 - y[..., None]) + c1 * y[..., None] + stripes).clip(0, 255)
    objects = []
    for _ in range(rng.integers(1, 4)):
        radius = rng.uniform(0.08, 0.16) * size
        objects.append(dict(kind=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                            pos=rng.uniform(radius, size - radius, 2), radius=radius,
                            vel=rng.choice([-1, 1], 2) * rng.uniform(0.02, 0.06, 2) * size))
        if motion == "by_kind":  # drawn above all the same, so that the first frame does not depend on `motion`
            objects[-1]["vel"] = np.asarray(KIND_VELOCITY[objects[-1]["kind"]]) * size
        objects[-1]["direction"] = _direction(objects[-1]["vel"])  # as it starts (it may bounce later)
    video = np.empty((num_frames, size, size, 3), np.uint8)
    mask = np.zeros((num_frames, size, size), np.uint8)
    for f in range(num_frames):
        frame = background.copy()
        for o in objects:
            m = _shape_mask(o["kind"], o["pos"], o["radius"], size)
            frame[m] = COLOURS[o["colour"]]
            mask[f][m] = 1
            o["pos"] = o["pos"] + o["vel"]
            for axis in range(2):  # bounce off the borders
                if not o["radius"] <= o["pos"][axis] <= size - o["radius"]:
                    o["vel"][axis] *= -1
                    o["pos"][axis] = np.clip(o["pos"][axis], o["radius"], size - o["radius"])
        video[f] = frame.astype(np.uint8)
    caption = " and ".join(f"a {o['colour']} {o['kind']} moving {o['direction']}" for o in objects)
    return {"video": video, "caption": caption, "first_frame": video[0], "mask": mask}


class MovingShapes:
    """Random-access source (len, getitem) of `make_clip` examples."""

    def __init__(self, num_examples: int = 1000, *, num_frames: int = 16, size: int = 64, seed: int = 0,
                 motion: str = "random"):
        _check_motion(motion)  # here, not at the first clip
        self.num_examples, self.num_frames, self.size, self.seed = num_examples, num_frames, size, seed
        self.motion = motion

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        return make_clip(index, num_frames=self.num_frames, size=self.size, seed=self.seed, motion=self.motion)
