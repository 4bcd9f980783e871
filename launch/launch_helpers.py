"""Small argument parsers shared by the launch scripts."""
from __future__ import annotations


def parse_lora(spec: str) -> tuple[str, float]:
    """'path/to/lora.safetensors:0.8' -> (path, 0.8); no scale (or a ':' inside the path) -> scale 1.0."""
    path, sep, scale = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        return path, float(scale)
    except ValueError:
        return spec, 1.0
