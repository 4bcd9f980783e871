"""A random-access source of examples -> a deterministic, resumable stream of tokenised training batches.

Batch n of the stream is a pure function of (seed, n): an epoch is a seeded permutation of the examples, this
host takes its slice of every global batch (`jax.process_index()` of `jax.process_count()`), and the stream's
state is just the next batch number, so a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np


class BatchStream:
    def __init__(self, source: Sequence[dict], *, global_batch: int, seed: int, tokenize: Callable,
                 caption_dropout: float = 0.0, process_index: int | None = None, process_count: int | None = None,
                 with_mask: bool = False, with_frame_masks: bool = False):
        self.source, self.seed, self.tokenize, self.dropout = source, seed, tokenize, caption_dropout
        self.with_mask = with_mask  # MagDiff: the first frame's subject mask as batch['mask'] (B, H, W)
        self.with_frame_masks = with_frame_masks  # every frame's, as batch['frame_masks'] (B, F, H, W)
        self.count = jax.process_count() if process_count is None else process_count
        self.index = jax.process_index() if process_index is None else process_index
        if len(source) == 0:
            raise ValueError("the dataset is empty; check the data folder / config.data")
        if global_batch % self.count:
            raise ValueError(f"global batch {global_batch} does not split over {self.count} hosts")
        self.global_batch, self.local_batch = global_batch, global_batch // self.count
        self.next = 0
        self._epoch_order: tuple[int, np.ndarray | None] = (-1, None)  # (epoch, its order of the examples)

    def get_state(self) -> dict:
        return {"next": self.next, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the checkpoint's data seed {state['seed']} differs from this run's {self.seed}")
        self.next = int(state["next"])

    def _indices(self, n: int) -> np.ndarray:
        per_epoch = max(len(self.source) // self.global_batch, 1)
        epoch, within = divmod(n, per_epoch)
        if self._epoch_order[0] != epoch:  # one permutation per epoch, not per batch (large sources)
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            self._epoch_order = (epoch, np.resize(order, per_epoch * self.global_batch))  # tiny ones repeat
        order = self._epoch_order[1]
        batch = order[within * self.global_batch:(within + 1) * self.global_batch]
        return batch[self.index * self.local_batch:(self.index + 1) * self.local_batch]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        examples = [self.source[int(i)] for i in self._indices(self.next)]
        # CFG's caption dropout, drawn for the whole global batch so that every host count drops the same rows.
        keep = np.random.default_rng([self.seed, self.next, 1]).random(self.global_batch) >= self.dropout
        keep = keep[self.index * self.local_batch:(self.index + 1) * self.local_batch]
        captions = [e["caption"] if k else "" for e, k in zip(examples, keep)]
        self.next += 1
        video = np.stack([e["video"] for e in examples]).astype(np.float32) / 127.5 - 1.0
        batch = {"video": video, "input_ids": np.asarray(self.tokenize(captions), np.int32)}
        if self.with_mask:
            batch["mask"] = np.stack([e["mask"][0] for e in examples]).astype(np.float32)
        if self.with_frame_masks:
            batch["frame_masks"] = np.stack([e["mask"] for e in examples]).astype(np.float32)
        return batch


class TokenizedBatches:
    """A grain iterator of vdjax.data.pipeline batches -> the trainer's {'video', 'input_ids'[, 'mask',
    'frame_masks']}, with its get_state/set_state passed through, so checkpoints resume the data stream too."""

    def __init__(self, iterator, tokenize: Callable, with_mask: bool = False, with_frame_masks: bool = False):
        self.iterator, self.tokenize, self.with_mask = iterator, tokenize, with_mask
        self.with_frame_masks = with_frame_masks

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.iterator)
        out = {"video": np.asarray(batch["video"], np.float32),
               "input_ids": np.asarray(self.tokenize(list(batch["caption"])), np.int32)}
        if self.with_mask:  # rows without a mask have all ones: the whole frame is the subject
            out["mask"] = np.asarray(batch["mask"][:, 0], np.float32)
        if self.with_frame_masks:
            out["frame_masks"] = np.asarray(batch["mask"], np.float32)
        return out
