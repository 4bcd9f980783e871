"""Sinusoidal embeddings: diffusion timesteps (SD's flip_sin_to_cos/shift variant) and temporal positions."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdjax.layers.primitives import EMBED, HIDDEN, dense


def timestep_sinusoid(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                      max_period: float = 10000.0) -> jax.Array:
    """(B,) timesteps -> (B, dim) float32: [sin | cos] of t * max_period^(-i / (half - shift)), or [cos | sin]."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)], -1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2 on the sinusoid (diffusers' `TimestepEmbedding`)."""

    def __init__(self, in_dim: int, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = dense(in_dim, embed_dim, (EMBED, HIDDEN), dtype=dtype, rngs=rngs)
        self.linear_2 = dense(embed_dim, embed_dim, (HIDDEN, EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def position_table(max_len: int, dim: int) -> np.ndarray:
    """AnimateDiff's temporal position encoding (1, max_len, dim): sin on even channels, cos on odd ones.

    Computed in float32 as upstream does, so that it equals the `pos_encoder.pe` buffers in released files.
    """
    position = np.arange(max_len, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
    pe = np.zeros((1, max_len, dim), np.float32)
    pe[0, :, 0::2] = np.sin(position * div_term)
    pe[0, :, 1::2] = np.cos(position * div_term)
    return pe
