"""ResNet block with time embedding, and the 2x down/up-sampling convolutions (frames folded into the batch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vdjax.layers.primitives import EMBED, HIDDEN, GroupNorm, conv2d, dense


class ResnetBlock(nnx.Module):
    """norm1 -> SiLU -> conv1 (+ time embedding) -> norm2 -> SiLU -> conv2, plus a (1x1-conv) shortcut.

    `norm_scope='clip'` takes GroupNorm statistics over all frames of a clip (AnimateDiff v1's non-inflated
    GroupNorm); `'frame'` over each frame alone (SD, diffusers, AnimateDiff v2/v3).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, *, groups: int, eps: float,
                 norm_scope: str = "frame", dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm_scope = norm_scope
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype, rngs=rngs)
        self.conv1 = conv2d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (dense(temb_channels, out_channels, (EMBED, HIDDEN), dtype=dtype, rngs=rngs)
                              if temb_channels else None)  # the VAE's blocks have no time embedding
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, dtype=dtype, rngs=rngs)
        self.conv2 = conv2d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)

    def _norm(self, norm: GroupNorm, x: jax.Array, batch: int) -> jax.Array:
        if self.norm_scope == "clip":
            return norm(x.reshape(batch, -1, x.shape[-1])).reshape(x.shape)
        return norm(x)

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x: (B*F, H, W, C); temb: (B, T) — one time embedding per clip, shared by its frames — or None."""
        batch = x.shape[0] if temb is None else temb.shape[0]
        h = self.conv1(jax.nn.silu(self._norm(self.norm1, x, batch)))
        if self.time_emb_proj is not None:
            t = self.time_emb_proj(jax.nn.silu(temb))
            h = (h.reshape(batch, -1, *h.shape[1:]) + t[:, None, None, None, :]).reshape(h.shape)
        h = self.conv2(jax.nn.silu(self._norm(self.norm2, h, batch)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(nnx.Module):
    """3x3 convolution with stride 2: padding 1 (the UNet), or 0 before and 1 after (the VAE's `(0, 1, 0, 1)`)."""

    def __init__(self, channels: int, *, asymmetric: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        padding = ((0, 1), (0, 1)) if asymmetric else None
        self.conv = conv2d(channels, channels, 3, stride=2, padding=padding, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
