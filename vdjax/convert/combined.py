"""Several state dicts seen as one, each under its own namespace ('unet:down_blocks...', 'motion:...').

A UNet whose spatial weights come from an SD file and whose motion modules come from an AnimateDiff file is
filled in one strict pass: its key function names the namespace per parameter.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from vdjax.convert.readers import LazyStateDict, shape_of


def combine(parts: Mapping[str, Mapping[str, np.ndarray]]) -> LazyStateDict:
    shapes, where = {}, {}
    for name, state in parts.items():
        for key in state:
            shapes[f"{name}:{key}"] = shape_of(state, key)
            where[f"{name}:{key}"] = (state, key)
    source = ", ".join(getattr(s, "source", name) for name, s in parts.items())
    return LazyStateDict(source, shapes, lambda k: where[k][0][where[k][1]])


def namespaced(name: str, key_fn: Callable) -> Callable:
    return lambda path: f"{name}:{key_fn(path)}"


def split_ignore(ignores: Mapping[str, Callable[[str], bool]]) -> Callable[[str], bool]:
    """An ignore function over combined keys from one per namespace."""
    def ignore(key: str) -> bool:
        name, _, inner = key.partition(":")
        return ignores.get(name, lambda k: False)(inner)
    return ignore
