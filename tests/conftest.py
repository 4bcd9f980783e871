"""Shared test helpers: config loading, PyTorch reference randomisation, and error measures."""
from __future__ import annotations

import importlib.util
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(spec: str):
    """'configs/animatediff_sd15.py:variant=tiny_v2' -> the ConfigDict, as absl's config_flags would build it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def randomize_torch(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Re-draw every parameter (zero-initialised ones included) so that each one moves the output.

    Matrices get a fan-in scaled normal, norm scales 1 + noise, vectors small noise; returns the state dict.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def max_abs_error(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    # Deterministic, comparable references on the 2-core CI machine.
    try:
        import torch
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass


def randomize_nnx(model, seed: int = 0) -> None:
    """Re-draw every parameter of a vdjax model in place (zero-initialised ones included), as `randomize_torch`."""
    import jax.numpy as jnp
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(seed)  # numpy: jax.random would compile a kernel per parameter shape
    for path, var in flat:
        noise = rng.standard_normal(var.shape).astype(np.float32)
        if var.ndim >= 2:
            value = noise / np.sqrt(np.prod(var.shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + 0.2 * noise
        else:
            value = 0.2 * noise
        var.set_value(jnp.asarray(value))
    nnx.update(model, nnx.from_flat_state(flat))
