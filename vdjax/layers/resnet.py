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
    """Nearest-neighbour 2x, then a 3x3 convolution: computed on the low-resolution input, as one 2x2 convolution per
    output phase (`upsample_conv`), 2.25x fewer multiplies than convolving the upsampled tensor and never building it.
    """

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return upsample_conv(x, self.conv.kernel[...], self.conv.bias[...], dtype=self.conv.dtype)


def _phase_taps(kernel: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """A 3-tap kernel axis seen from the low-resolution grid: even output rows 2i read upsampled rows 2i-1, 2i, 2i+1
    = input rows i-1, i, i (taps [k0, k1 + k2]); odd rows 2i+1 read i, i, i+1 (taps [k0 + k1, k2])."""
    k0, k1, k2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
    return jnp.stack([k0, k1 + k2], axis), jnp.stack([k0 + k1, k2], axis)


def upsample_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, dtype=jnp.float32) -> jax.Array:
    """conv3x3(nearest_upsample_2x(x)) with padding 1, for x (N, H, W, C) and an HWIO kernel -> (N, 2H, 2W, C').

    The four output phases (row parity a, column parity b) are 2x2 convolutions of the zero-padded input; one VALID
    convolution computes all four as 4 C' output channels, phase (a, b) at offset (a, b) of its (H+1, W+1) output.
    """
    n, h, w, _ = x.shape
    out = kernel.shape[-1]
    phases = [k_ab for k_a in _phase_taps(kernel, 0) for k_ab in _phase_taps(k_a, 1)]  # (a, b) = 00, 01, 10, 11
    k = jnp.concatenate(phases, axis=-1).astype(dtype)  # (2, 2, C, 4 C'): summed in the parameters' precision
    x = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(n, h + 1, w + 1, 2, 2, out)
    rows = [jnp.stack([y[:, a:a + h, b:b + w, a, b] for b in range(2)], axis=3) for a in range(2)]  # (N, H, W, 2, C')
    return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, out) + bias.astype(dtype)
