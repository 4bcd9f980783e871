"""AnimateDiff's motion module: a transformer whose attention runs over the frames at each pixel."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vdjax.layers.attention import Attention
from vdjax.layers.embeddings import position_table
from vdjax.layers.primitives import EMBED, HIDDEN, GroupNorm, dense, layer_norm
from vdjax.layers.spatial_transformer import FeedForward


class TemporalTransformerBlock(nnx.Module):
    """Two temporal self-attentions (positions added to the normed input of each), then a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, max_positions: int, impl: str = "xla",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(dim, heads, head_dim, impl=impl, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(dim, heads, head_dim, impl=impl, dtype=dtype, rngs=rngs)
        self.norm3 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        # The position table is a constant, not state: built at trace time (released files carry it as the
        # `pos_encoder.pe` buffer; the converters check it against this one).
        self.max_positions, self.dim = max_positions, dim

    def _with_positions(self, h: jax.Array) -> jax.Array:
        if not self.max_positions:
            return h
        return h + jnp.asarray(position_table(self.max_positions, self.dim)[:, : h.shape[1]], h.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B*H*W, F, dim) — one sequence of frames per pixel."""
        x = x + self.attn1(self._with_positions(self.norm1(x)))
        x = x + self.attn2(self._with_positions(self.norm2(x)))
        return x + self.ff(self.norm3(x))


class MotionModule(nnx.Module):
    """GroupNorm -> proj_in -> temporal blocks -> proj_out (zero at init, so a new module starts as identity).

    `norm_scope='frame'` (the original AnimateDiff code, which the released motion modules were trained with)
    takes GroupNorm statistics per frame; `'clip'` over all frames at once, as diffusers' `AnimateDiffTransformer3D`.
    """

    def __init__(self, channels: int, heads: int, *, num_layers: int = 1, max_positions: int = 32,
                 groups: int = 32, norm_scope: str = "frame", head_dim_divisor: int = 1, impl: str = "xla",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        head_dim = channels // heads // head_dim_divisor
        inner = heads * head_dim
        self.norm_scope, self.max_positions = norm_scope, max_positions
        self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype, rngs=rngs)
        self.proj_in = dense(channels, inner, (EMBED, HIDDEN), dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([
            TemporalTransformerBlock(inner, heads, head_dim, max_positions=max_positions, impl=impl, dtype=dtype,
                                     rngs=rngs) for _ in range(num_layers)])
        self.proj_out = dense(inner, channels, (HIDDEN, EMBED), zero_init=True, dtype=dtype, rngs=rngs)

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
        h = self.proj_in(h)
        # (B, F, H, W, D) -> (B, H, W, F, D): attend over frames at each pixel.
        h = h.reshape(batch, num_frames, hgt * wid, -1).transpose(0, 2, 1, 3).reshape(batch * hgt * wid, num_frames, -1)
        for block in self.transformer_blocks:
            h = block(h)
        h = h.reshape(batch, hgt * wid, num_frames, -1).transpose(0, 2, 1, 3).reshape(n, hgt, wid, -1)
        return x + self.proj_out(h)
