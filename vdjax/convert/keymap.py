"""Strict filling of a model's parameters from a PyTorch-style state dict, through a key map.

A format module supplies `key_fn(path) -> checkpoint key` for each vdjax parameter path; this module does the
layout transforms and the bookkeeping: every parameter filled, every checkpoint key used or ignored by name,
shapes checked — otherwise one error that lists everything wrong at once.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdjax.convert.readers import shape_of

Path = tuple


@dataclasses.dataclass(frozen=True)
class PartMap:
    """How one model part reads one checkpoint layout."""
    key_fn: Callable[[Path], str]
    ignore: Callable[[str], bool] = lambda key: False
    prepare: Callable[[Mapping], Mapping] = lambda state: state  # lazy pre-pass, e.g. split packed projections


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


def plan(model: nnx.Module, state_dict: Mapping[str, np.ndarray], key_fn: Callable[[Path], str], *,
         ignore: Callable[[str], bool] = lambda key: False, select: Callable[[Path], bool] = lambda p: True,
         source: str = "checkpoint") -> dict[Path, str]:
    """{parameter path: checkpoint key} for every selected parameter, checked by shape without reading values.

    Every key of `state_dict` must be used or accepted by `ignore`; otherwise one `KeyMapError` lists the problems.
    """
    missing, misshaped, mapping = [], [], {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not select(path):
            continue
        key = key_fn(path)
        if key not in state_dict:
            missing.append(key)
            continue
        mapping[path] = key
        file_shape = shape_of(state_dict, key)
        if _flax_shape(file_shape, path, var.ndim) != tuple(var.shape):
            misshaped.append(f"{key}: file {file_shape}, model {tuple(var.shape)} (flax layout)")
    used = set(mapping.values())
    unexpected = sorted(k for k in state_dict if k not in used and not ignore(k))
    if missing or unexpected or misshaped:
        raise KeyMapError(source, sorted(missing), unexpected, misshaped)
    return mapping


def _flax_shape(shape: tuple, path: Path, ndim: int) -> tuple:
    if path[-1] != "kernel" or len(shape) != ndim or ndim < 2:
        return tuple(shape)
    return (*shape[2:], shape[1], shape[0]) if ndim > 2 else (shape[1], shape[0])


def converted(state_dict: Mapping[str, np.ndarray], key: str, path: Path, ndim: int) -> np.ndarray:
    """One tensor in vdjax's layout. Only kernels change layout; embeddings, norms and biases are stored alike."""
    value = np.asarray(state_dict[key])
    return to_flax_layout(value, ndim) if path[-1] == "kernel" else value


def load_params(model: nnx.Module, state_dict: Mapping[str, np.ndarray], key_fn: Callable[[Path], str], *,
                ignore: Callable[[str], bool] = lambda key: False, select: Callable[[Path], bool] = lambda p: True,
                source: str = "checkpoint", dtype=jnp.float32) -> None:
    """Fill `model`'s parameters (those whose path `select` accepts) in place from `state_dict`.

    Keys of `state_dict` must all be used or accepted by `ignore`; otherwise a `KeyMapError` lists the problems
    and the model is left unchanged.
    """
    mapping = plan(model, state_dict, key_fn, ignore=ignore, select=select, source=source)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, key in mapping.items():
        flat[path].set_value(jnp.asarray(converted(state_dict, key, path, flat[path].ndim), dtype))
    nnx.update(model, nnx.from_flat_state(flat))


def load_sharded(abstract_model: nnx.Module, state_dict: Mapping[str, np.ndarray], key_fn: Callable[[Path], str], *,
                 shardings: Mapping[Path, jax.sharding.Sharding] | None = None, dtype=jnp.float32,
                 ignore: Callable[[str], bool] = lambda key: False, source: str = "checkpoint",
                 progress: Callable[[int, int, str], None] | None = None) -> nnx.Module:
    """A concrete model from an abstract one (`nnx.eval_shape`), each parameter read, converted on the host, cast
    and put straight into its sharding one at a time: the host holds one tensor, never the model.

    The model must hold no state but parameters (vdjax's models keep constants out of their state).
    """
    mapping = plan(abstract_model, state_dict, key_fn, ignore=ignore, source=source)
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    flat = dict(nnx.to_flat_state(params))

    for i, (path, key) in enumerate(mapping.items()):
        # Contiguous in the target dtype on the host (a strided device_put is slower), then one copy to the
        # devices; jnp.asarray would dispatch a conversion op per parameter.
        value = np.ascontiguousarray(converted(state_dict, key, path, flat[path].ndim), dtype=dtype)
        flat[path].set_value(jax.device_put(value, shardings.get(path) if shardings else None))
        del value
        if progress:
            progress(i + 1, len(mapping), key)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
