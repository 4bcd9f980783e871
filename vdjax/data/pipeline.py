"""A random-access source of clips -> a deterministic, checkpointable grain stream of numpy training batches.

    ds = make_dataset(MovingShapes(1000), batch_size=4, num_frames=16, size=64, seed=0)
    it = iter(ds)                  # a grain DatasetIterator
    batch = next(it)               # video (B, F, S, S, 3) float32 in [-1, 1], caption [str] * B, first_frame,
                                   # mask (B, F, S, S) float32, has_mask (B,), index (B,) source rows
    state = it.get_state()         # a small JSON-able dict; it.set_state(state) on a fresh iterator resumes exactly

Order: each epoch is a seeded global permutation of the source (grain reseeds the shuffle per epoch), cut to a
multiple of the host count so that every host gets the same number of examples, and host h takes every h-th one.
Everything random about one example (clip start, caption dropout) comes from an RNG seeded with
(seed, source index, epoch), so a batch does not depend on threads, prefetching or where a run was resumed.
"""
from __future__ import annotations

import grain
import numpy as np


def _square(frames: np.ndarray, size: int, resample) -> np.ndarray:
    """Centre crop to a square, then resize to `size` (= resize the short side, then centre crop)."""
    from PIL import Image

    h, w = frames.shape[1:3]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    frames = frames[:, top:top + s, left:left + s]
    if s == size:
        return frames
    # PIL's resize widens its filter when shrinking (antialiased), unlike a plain bilinear gather.
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), resample)) for f in frames])


def _clip_start(length: int, num_frames: int, stride: int, rng) -> tuple[int, int] | None:
    """(start, stride) of a clip of `num_frames` frames; the stride shrinks for short videos; None if too short."""
    while stride > 1 and (num_frames - 1) * stride + 1 > length:
        stride -= 1
    span = (num_frames - 1) * stride + 1
    if span > length:
        return None
    return int(rng.integers(0, length - span + 1)), stride


def _example(source, index: int, epoch: int, *, num_frames, size, seed, frame_stride, caption_dropout):
    from PIL import Image

    example = source[index]
    if example is None:  # a video that did not decode: the source has logged and counted it
        return None
    rng = np.random.default_rng([seed, index, epoch])
    video = example["video"]
    picked = _clip_start(len(video), num_frames, frame_stride, rng)
    if picked is None:
        return None
    start, stride = picked
    frames = np.arange(start, start + (num_frames - 1) * stride + 1, stride)
    video = _square(video[frames], size, Image.BICUBIC)
    mask = _square(example["mask"][frames], size, Image.NEAREST)  # nearest keeps the mask binary
    video = video.astype(np.float32) / 127.5 - 1.0
    # Classifier-free guidance training: the caption is dropped for this example in this epoch, reproducibly.
    caption = "" if rng.random() < caption_dropout else example["caption"]
    return {"video": video, "caption": caption, "first_frame": video[0], "mask": mask.astype(np.float32),
            "has_mask": bool(example.get("has_mask", True)), "index": index}


def _batch(examples: list[dict]) -> dict:
    out = {k: np.stack([e[k] for e in examples]) for k in ("video", "first_frame", "mask", "has_mask", "index")}
    out["caption"] = [e["caption"] for e in examples]  # a list: what tokenizers take
    return out


def make_dataset(source, *, batch_size: int, num_frames: int, size: int, seed: int, shuffle: bool = True,
                 frame_stride: int = 1, caption_dropout: float = 0.0, shard_index: int | None = None,
                 shard_count: int | None = None, num_epochs: int | None = None, num_threads: int = 4,
                 prefetch: int | None = None) -> grain.IterDataset:
    """`iter()` of the result is a grain iterator with `get_state()` / `set_state()`; see the module docstring.

    num_epochs=None repeats forever. Batches are always full (the last partial one of a finite run is dropped), so
    that a jitted step sees one shape.
    """
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1]; got {caption_dropout}")
    if batch_size < 1 or num_frames < 1 or size < 1 or frame_stride < 1:
        raise ValueError("batch_size, num_frames, size and frame_stride must be positive")
    n = len(source)
    per_host = n // shard_count
    if per_host == 0:
        raise ValueError(f"the dataset has {n} examples, fewer than the {shard_count} hosts reading it")

    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed)  # a new permutation each epoch (grain folds the epoch into the seed)
    # Cut each epoch to a multiple of the host count (slicing keeps grain's epoch arithmetic), then deal it out.
    ds = ds[:per_host * shard_count][shard_index::shard_count].repeat(num_epochs)
    options = dict(num_frames=num_frames, size=size, seed=seed, frame_stride=frame_stride,
                   caption_dropout=caption_dropout)
    ds = ds.map_with_index(lambda pos, i: _example(source, int(i), pos // per_host, **options))
    # to_iter_dataset drops the Nones (undecodable or too-short videos); threads overlap video decoding.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch or max(2 * batch_size, num_threads)))
    return ds.batch(batch_size, drop_remainder=True, batch_fn=_batch)
