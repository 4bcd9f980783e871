"""`VideoFolder`: a random-access source over a folder of videos and a captions file.

The captions file is CSV (header `video,caption[,mask]`) or JSONL (one `{"video": ..., "caption": ...[, "mask": ...]}`
per line); paths are relative to the folder. `mask` names a mask video or a folder of PNG frames (white = subject).
The folder and captions file are checked up front (so that a typo fails at start-up, not hours into a run); videos
are decoded lazily, and one that fails to decode is logged, counted and returned as `None`, which the pipeline drops.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import threading

import numpy as np

from vdjax.io.video import read_video

log = logging.getLogger(__name__)

CAPTION_FILES = ("captions.csv", "captions.jsonl", "metadata.csv", "metadata.jsonl")
VIDEO_EXTS = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")


def _read_captions(path: str) -> list[dict]:
    if path.lower().endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not a JSON object ({e})") from e
    elif path.lower().endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{path}: captions must be a .csv or .jsonl file")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("video") or row.get("caption") is None:
            raise ValueError(f"{path}: row {n} needs 'video' and 'caption' (got {row!r})")
    return rows


class VideoFolder:
    """`len` / `getitem` over the rows of a captions file: {'video', 'caption', 'first_frame', 'mask'} or None.

    `mask` is uint8 (F, H, W) in {0, 1}; rows without a mask get all ones (the whole frame is the subject) and
    `has_mask=False`.
    """

    def __init__(self, root: str, captions: str | None = None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"{root}: no such folder")
        if captions is None:
            found = [n for n in CAPTION_FILES if os.path.isfile(os.path.join(root, n))]
            if not found:
                videos = [n for n in os.listdir(root) if n.lower().endswith(VIDEO_EXTS)]
                what = f"{len(videos)} videos but" if videos else "no videos and"
                raise ValueError(f"{root}: {what} no captions file; add one of {', '.join(CAPTION_FILES)} with "
                                 "columns video,caption (paths relative to the folder)")
            captions = os.path.join(root, found[0])
        elif not os.path.isabs(captions) and not os.path.isfile(captions):
            captions = os.path.join(root, captions)
        if not os.path.isfile(captions):
            raise ValueError(f"{captions}: no such captions file")
        self.root, self.captions_path = root, captions
        self.rows = _read_captions(captions)
        if not self.rows:
            raise ValueError(f"{captions}: no rows; the dataset would be empty")
        # Every named file must exist: report them all at once rather than one per restart.
        missing = sorted({p for r in self.rows for p in (r["video"], r.get("mask")) if p
                          and not os.path.exists(os.path.join(root, p))})
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise ValueError(f"{captions} names {len(missing)} files missing from {root}: {shown}")
        self._failed: set[int] = set()
        self._lock = threading.Lock()  # grain reads with threads

    @property
    def num_failed(self) -> int:
        """How many distinct rows failed to decode so far (each is skipped)."""
        return len(self._failed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict | None:
        if not 0 <= index < len(self.rows):
            raise IndexError(index)
        if index in self._failed:  # known bad: do not pay for the decode again every epoch
            return None
        row = self.rows[index]
        try:
            video = read_video(os.path.join(self.root, row["video"]))
            if video.ndim != 4 or len(video) == 0:
                raise ValueError(f"decoded to shape {video.shape}")
            if row.get("mask"):
                mask = (read_video(os.path.join(self.root, row["mask"]))[..., 0] > 127).astype(np.uint8)
                if mask.shape != video.shape[:3]:
                    raise ValueError(f"mask shape {mask.shape} != video {video.shape[:3]}")
            else:
                mask = np.ones(video.shape[:3], np.uint8)
        except Exception as e:  # noqa: BLE001 — any decode problem skips this one video, not the run
            with self._lock:
                self._failed.add(index)
                count = len(self._failed)
            log.warning("skipping %s (%s); %d video(s) skipped so far", row["video"], e, count)
            return None
        return {"video": video, "caption": str(row["caption"]), "first_frame": video[0], "mask": mask,
                "has_mask": bool(row.get("mask"))}
