"""Strict filling of a model's parameters from a PyTorch-style state dict, through a key map.

A format module supplies `key_fn(path) -> checkpoint key` for each vdjax parameter path; this module does the
layout transforms and the bookkeeping: every parameter filled, every checkpoint key used or ignored by name,
shapes checked — otherwise one error that lists everything wrong at once.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple


class KeyMapError(ValueError):
    """A checkpoint that does not fit the model: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], misshaped: list[str]):
        lines = [f"{source} does not fit the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {len(items)} {title} key(s):\n    " + "\n    ".join(shown))
        lines.append("  Check that the file is for this model family and variant (config), or that the "
                     "config matches the file.")
        super().__init__("\n".join(lines))
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped


def path_to_key(path: Path) -> str:
    return ".".join(str(p) for p in path)


def rename(key: str, rules: Iterable[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def torch_leaf(key: str) -> str:
    """flax leaf names -> torch's: `kernel` and norm `scale` are both `weight`."""
    return re.sub(r"\.(kernel|scale)$", ".weight", key)


def to_flax_layout(value: np.ndarray, target_ndim: int) -> np.ndarray:
    """torch Linear (out, in) -> (in, out); Conv2d (O, I, kh, kw) -> (kh, kw, I, O); Conv1d (O, I, k) -> (k, I, O);
    Conv3d (O, I, kt, kh, kw) -> (kt, kh, kw, I, O); vectors unchanged."""
    value = np.asarray(value)
    if value.ndim != target_ndim or value.ndim < 2:
        return value
    return value.transpose(*range(2, value.ndim), 1, 0) if value.ndim > 2 else value.T


def load_params(model: nnx.Module, state_dict: Mapping[str, np.ndarray], key_fn: Callable[[Path], str], *,
                ignore: Callable[[str], bool] = lambda key: False, select: Callable[[Path], bool] = lambda p: True,
                source: str = "checkpoint", dtype=jnp.float32) -> None:
    """Fill `model`'s parameters (those whose path `select` accepts) in place from `state_dict`.

    Keys of `state_dict` must all be used or accepted by `ignore`; otherwise a `KeyMapError` lists the problems
    and the model is left unchanged.
    """
    params = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(params))
    missing, misshaped, updates, used = [], [], {}, set()
    for path, var in flat.items():
        if not select(path):
            continue
        key = key_fn(path)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        # Only kernels change layout; embeddings, norms and biases are stored alike in torch and flax.
        value = to_flax_layout(state_dict[key], var.ndim) if path[-1] == "kernel" else np.asarray(state_dict[key])
        if value.shape != var.shape:
            misshaped.append(f"{key}: file {tuple(np.shape(state_dict[key]))} -> {value.shape}, "
                             f"model {tuple(var.shape)}")
            continue
        updates[path] = value
    unexpected = sorted(k for k in state_dict if k not in used and not ignore(k))
    if missing or unexpected or misshaped:
        raise KeyMapError(source, sorted(missing), unexpected, misshaped)
    for path, value in updates.items():
        flat[path].set_value(jnp.asarray(value, dtype))
    nnx.update(model, nnx.from_flat_state(flat))
