"""Small argument parsers shared by the launch scripts."""
from __future__ import annotations

import sys
import time


def parse_lora(spec: str) -> tuple[str, float]:
    """'path/to/lora.safetensors:0.8' -> (path, 0.8); no scale (or a ':' inside the path) -> scale 1.0."""
    path, sep, scale = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        return path, float(scale)
    except ValueError:
        return spec, 1.0


class ProgressBar:
    """A one-line progress bar on stderr: bar(label, done, total)."""

    def __init__(self, width: int = 30):
        self.width, self.start = width, time.perf_counter()

    def __call__(self, label: str, done, total) -> None:
        done, total = int(done), int(total)
        filled = int(self.width * done / total)
        sys.stderr.write(f"\r{label:<13}[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
                         f"{time.perf_counter() - self.start:6.1f}s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
