"""Device mesh and logical-axis rules: how each parameter's named axes map onto the mesh.

Parameters carry logical axis names (`vdjax.layers.primitives`: embed, mlp, heads, conv_in, conv_out, norm, vocab);
the rules map them to mesh axes (`data`, `fsdp`, `tensor`). A dimension that does not divide evenly by its mesh
axis is replicated instead, so tiny models and odd widths still load on any mesh.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# logical name -> mesh axis (None: replicated). FSDP shards the model dimension, tensor parallelism the inner ones.
DEFAULT_RULES: dict[str, str | None] = {
    "embed": "fsdp", "mlp": "tensor", "heads": "tensor", "conv_in": None, "conv_out": "tensor",
    "norm": None, "vocab": "tensor",
}


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """{'data': 2, 'fsdp': -1, 'tensor': 1} -> a Mesh over the devices; one -1 takes what is left."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} unknown; use {MESH_AXES}")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1; got {fill}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if fill:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices do not split into a mesh of {shape}")
        sizes[fill[0]] = len(devices) // fixed
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices; there are "
                         f"{len(devices)}. Make the axis sizes multiply to the device count (or use -1 for one).")
    return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), MESH_AXES)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Mapping[str, str | None] = DEFAULT_RULES) -> PartitionSpec:
    axes, used = [], set()
    for name, dim in zip(logical, shape):
        axis = rules.get(name) if name else None
        if axis is None or axis in used or dim % mesh.shape[axis]:
            axes.append(None)
        else:
            axes.append(axis)
            used.add(axis)
    return PartitionSpec(*axes)


def param_shardings(abstract_model: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES):
    """{parameter path: NamedSharding} for every Param of an abstract (or concrete) model."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param)):
        logical = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        out[path] = NamedSharding(mesh, spec_for(logical, var.shape, mesh, rules))
    return out
