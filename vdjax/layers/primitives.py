"""Parameterised primitives (dense, conv, norms) with logical axis names on every parameter.

Parameters are float32; `dtype` is the compute dtype. Logical names are mapped to mesh axes by
`vdjax.parallel` (see DESIGN.md, "Sharding"); they are metadata only until a mesh is given.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axis names used across the UNet.
EMBED, HIDDEN, HEADS, CONV_IN, CONV_OUT, NORM = "embed", "mlp", "heads", "conv_in", "conv_out", "norm"


def axis_names(names) -> dict:
    """Variable metadata naming each axis of a parameter (lazy: applied as shardings once a mesh is known)."""
    return {"out_sharding": names, "eager_sharding": False}


def dense(in_features: int, out_features: int, axes=(EMBED, HIDDEN), *, use_bias: bool = True,
          zero_init: bool = False, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    kernel_init = nnx.initializers.zeros if zero_init else nnx.initializers.lecun_normal()
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=kernel_init, kernel_metadata=axis_names(axes),
                      bias_metadata=axis_names((axes[1],)), rngs=rngs)


def biased_dot(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """layer(x) for a Linear with a bias. On a CPU the bias goes into the product, as one more kernel row against
    a column of ones in x: XLA's CPU dot does not fuse a bias add, so a wide output (a GEGLU's 8 x dim) was written
    twice (at 32x32 latents, 64 channels: LayerNorm + GEGLU forward 69 -> 52 ms). Elsewhere an odd contraction
    width would cost more than the add saves, so it is the plain layer."""
    if jax.default_backend() != "cpu":
        return layer(x)
    dtype = layer.dtype or jnp.result_type(x.dtype, layer.kernel.dtype)  # as nnx.Linear promotes
    kernel = jnp.concatenate([layer.kernel[...], layer.bias[...][None]]).astype(dtype)
    ones = jnp.ones((*x.shape[:-1], 1), dtype)
    return jnp.concatenate([x.astype(dtype), ones], axis=-1) @ kernel


def conv2d(in_features: int, out_features: int, kernel_size: int = 3, *, stride: int = 1, padding=None,
           zero_init: bool = False, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
    """2-D convolution over (N, H, W, C); padding as PyTorch's `padding=k // 2` unless given ((top, bottom), (l, r))."""
    pad = kernel_size // 2
    kernel_init = nnx.initializers.zeros if zero_init else nnx.initializers.lecun_normal()
    return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=stride,
                    padding=padding or ((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, kernel_metadata=axis_names((None, None, CONV_IN, CONV_OUT)),
                    bias_metadata=axis_names((CONV_OUT,)), rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), in torch's erf form: jax.nn.gelu(approximate=False) goes through erfc, which XLA's
    CPU backend computes 2x slower (a GEGLU feed-forward's forward + backward: 70 -> 62 ms, torch 62)."""
    return 0.5 * x * (1 + jax.lax.erf(x * (2 ** -0.5)))


def layer_norm(features: int, *, eps: float = 1e-5, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # flax computes LayerNorm statistics in float32 even for bfloat16 inputs.
    return nnx.LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                         scale_metadata=axis_names((NORM,)), bias_metadata=axis_names((NORM,)), rngs=rngs)


class GroupNorm(nnx.Module):
    """GroupNorm over channels-last input (N, ..., C): statistics per sample and group over every middle axis.

    Statistics are float32 whatever the compute dtype. The caller picks what one "sample" is: fold the frames
    into N for per-frame statistics, or into the middle axes for statistics over the whole clip.
    """

    def __init__(self, num_groups: int, channels: int, *, eps: float, dtype=jnp.float32, rngs: nnx.Rngs):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels cannot be split into {num_groups} groups; "
                             "use a channel count divisible by the group count.")
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32), **axis_names((NORM,)))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), **axis_names((NORM,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape, per_group = x.shape, x.shape[-1] // self.num_groups
        flat = x.astype(jnp.float32).reshape(shape[0], -1, shape[-1])  # (N, positions, C)
        count = flat.shape[1] * per_group

        def per_channel(group_stat):  # (N, G) -> (N, 1, C)
            return jnp.repeat(group_stat, per_group, axis=1)[:, None, :]

        # Sum over the positions first (contiguous rows of C), then within each group: 5x faster on XLA's CPU
        # backend than one reduction over (positions, channels in the group), and as exact (two passes).
        def group_mean(v):
            return v.sum(axis=1).reshape(shape[0], self.num_groups, per_group).sum(-1) / count

        mean = per_channel(group_mean(flat))
        var = per_channel(group_mean(jnp.square(flat - mean)))
        y = ((flat - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class InitKeys:
    """Parameter-init keys with a Python-side counter; pass it where a module takes `rngs`.

    `nnx.Rngs` counts in a Variable. Under `nnx.eval_shape` each count update makes JAX build an error message
    from the whole trace (quadratic in its length: ~20 s for the full SD 1.5 + motion UNet, 1 s with this).
    Initialisation needs no mutable state, so abstract (and concrete) models can be built with this instead.
    """

    def __init__(self, seed: int = 0):
        self._base = jax.random.key(seed)
        self._count = 0

    def params(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._base, self._count)
