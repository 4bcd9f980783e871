"""Temporal layers: transformers whose attention runs over the frames at each pixel (AnimateDiff's motion
module, VideoCrafter's TemporalTransformer and init_attn), and VideoCrafter's temporal convolution."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vdjax.layers.attention import Attention
from vdjax.layers.embeddings import position_table
from vdjax.layers.primitives import EMBED, HIDDEN, CONV_IN, CONV_OUT, GroupNorm, axis_names, dense, layer_norm
from vdjax.layers.spatial_transformer import FeedForward


class TemporalTransformerBlock(nnx.Module):
    """Two temporal self-attentions, then a GEGLU feed-forward, each pre-norm with a residual.

    AnimateDiff adds a sinusoidal position table to the normed input of each attention (`max_positions`);
    VideoCrafter instead gives each attention learned relative-position tables (`relative_positions`), and
    optionally a causal mask."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, max_positions: int = 0, relative_positions: int = 0,
                 causal: bool = False, impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        attn = lambda: Attention(dim, heads, head_dim, relative_positions=relative_positions, impl=impl, dtype=dtype,
                                 rngs=rngs)
        self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn1 = attn()
        self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn2 = attn()
        self.norm3 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        # The position table is a constant, not state: built at trace time (released files carry it as the
        # `pos_encoder.pe` buffer; the converters check it against this one).
        self.max_positions, self.dim, self.causal = max_positions, dim, causal

    def _with_positions(self, h: jax.Array) -> jax.Array:
        if not self.max_positions:
            return h
        return h + jnp.asarray(position_table(self.max_positions, self.dim)[:, : h.shape[1]], h.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B*H*W, F, dim) — one sequence of frames per pixel."""
        x = x + self.attn1(self._with_positions(self.norm1(x)), causal=self.causal)
        x = x + self.attn2(self._with_positions(self.norm2(x)), causal=self.causal)
        return x + self.ff(self.norm3(x))


def _pointwise(in_features: int, out_features: int, conv: bool, zero_init: bool, dtype, rngs):
    """A per-token projection: Linear, or a kernel-1 Conv1d over the frames (same math; the checkpoint's layout)."""
    if not conv:
        return dense(in_features, out_features, (EMBED, HIDDEN), zero_init=zero_init, dtype=dtype, rngs=rngs)
    init = nnx.initializers.zeros if zero_init else nnx.initializers.lecun_normal()
    return nnx.Conv(in_features, out_features, (1,), dtype=dtype, param_dtype=jnp.float32, kernel_init=init,
                    kernel_metadata=axis_names((None, CONV_IN, CONV_OUT)), bias_metadata=axis_names((CONV_OUT,)),
                    rngs=rngs)


class TemporalTransformer(nnx.Module):
    """GroupNorm -> proj_in -> temporal blocks -> proj_out (zero at init, so a new module starts as identity).

    AnimateDiff's motion module: `head_dim` = channels / heads, a position table of `max_positions`, GroupNorm
    statistics per frame (`norm_scope='frame'`, the original code the released modules were trained with) or over
    the clip (`'clip'`, diffusers' `AnimateDiffTransformer3D`). VideoCrafter's: GroupNorm over the clip, relative
    positions, optional causal mask, and kernel-1 Conv1d projections where upstream has them (`conv_projections`).
    """

    def __init__(self, channels: int, heads: int, *, head_dim: int | None = None, num_layers: int = 1,
                 max_positions: int = 32, relative_positions: int = 0, causal: bool = False, groups: int = 32,
                 norm_scope: str = "frame", conv_projections: bool = False, impl: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        head_dim = head_dim or channels // heads
        inner = heads * head_dim
        self.norm_scope, self.max_positions = norm_scope, max_positions
        self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype, rngs=rngs)
        self.proj_in = _pointwise(channels, inner, conv_projections, False, dtype, rngs)
        self.transformer_blocks = nnx.List([
            TemporalTransformerBlock(inner, heads, head_dim, max_positions=max_positions,
                                     relative_positions=relative_positions, causal=causal, impl=impl, dtype=dtype,
                                     rngs=rngs) for _ in range(num_layers)])
        self.proj_out = _pointwise(inner, channels, conv_projections, True, dtype, rngs)

    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        """x: (B*F, H, W, C), frames of a clip adjacent -> same shape."""
        n, hgt, wid, c = x.shape
        if self.max_positions and num_frames > self.max_positions:
            raise ValueError(f"{num_frames} frames exceed the motion module's position table of "
                             f"{self.max_positions}; use at most {self.max_positions} frames.")
        batch = n // num_frames
        if self.norm_scope == "clip":
            h = self.norm(x.reshape(batch, -1, c)).reshape(x.shape)
        else:
            h = self.norm(x)
        # (B, F, H, W, C) -> (B, H, W, F, C): attend over frames at each pixel.
        h = h.reshape(batch, num_frames, hgt * wid, c).transpose(0, 2, 1, 3).reshape(batch * hgt * wid, num_frames, c)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h)
        h = self.proj_out(h)
        h = h.reshape(batch, hgt * wid, num_frames, c).transpose(0, 2, 1, 3).reshape(x.shape)
        return x + h


class TemporalConvBlock(nnx.Module):
    """VideoCrafter's temporal convolution after a ResBlock: 4 x [GroupNorm over the clip, SiLU, Conv3d with
    kernel (3, 1, 1) (over frames only, zero-padded)], plus the input. The last conv starts at zero (identity).
    `images_unchanged`: a single frame passes unchanged (MagDiff's released TemporalConvLayer)."""

    def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-5, images_unchanged: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.images_unchanged = images_unchanged
        self.norms = nnx.List([GroupNorm(groups, channels, eps=eps, dtype=dtype, rngs=rngs) for _ in range(4)])
        self.convs = nnx.List([
            nnx.Conv(channels, channels, (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)), dtype=dtype,
                     param_dtype=jnp.float32,
                     kernel_init=nnx.initializers.zeros if i == 3 else nnx.initializers.lecun_normal(),
                     kernel_metadata=axis_names((None, None, None, CONV_IN, CONV_OUT)),
                     bias_metadata=axis_names((CONV_OUT,)), rngs=rngs) for i in range(4)])

    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        """x: (B*F, H, W, C), frames of a clip adjacent -> same shape."""
        if self.images_unchanged and num_frames == 1:
            return x
        n, hgt, wid, c = x.shape
        h = x.reshape(n // num_frames, num_frames, hgt, wid, c)
        for norm, conv in zip(self.norms, self.convs):
            h = conv(jax.nn.silu(norm(h)))  # GroupNorm over (F, H, W) of each clip
        return x + h.reshape(x.shape)
