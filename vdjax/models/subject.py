"""MagDiff's subject conditioning: the subject image at several resolutions (High-Fidelity Alignment).

The subject image (image ∘ mask, Subject-Driven Alignment) is resized to each scale of a pyramid (the paper's three:
1, 1/2, 1/4 of the frame size), each level is VAE-encoded without noise (the posterior's mean), the coarser latents
are upsampled to the full latent size, and a 3x3 convolution fuses them into one latent that the UNet concatenates
with the noisy latent on channels. With one scale (the released code's single-scale variant) the full-size latent
is used as it is.

The fusion convolution starts as the identity on the full-size latent and zero on the coarser ones, so a pyramid
model starts as the single-scale one and learns what the coarser levels add.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vdjax.layers.primitives import conv2d


def pyramid_sizes(height: int, width: int, scales: Sequence[float], factor: int) -> list[tuple[int, int]]:
    """Pixel size of each pyramid level: height x width scaled, rounded to the VAE's factor (at least one latent)."""
    snap = lambda v: max(factor, int(round(v / factor)) * factor)
    return [(snap(height * s), snap(width * s)) for s in scales]


def encode_pyramid(vae, images: jax.Array, scales: Sequence[float], scaling_factor: float) -> tuple[jax.Array, ...]:
    """(B, H, W, 3) subject images in [-1, 1] -> one (B, h_s, w_s, C) latent per scale: resized (antialiased
    bilinear), VAE-encoded without noise (the posterior mean), times the VAE's scaling factor."""
    b, h, w, c = images.shape
    latents = []
    for size in pyramid_sizes(h, w, scales, vae.downsampling_factor):
        x = images if size == (h, w) else jax.image.resize(images, (b, *size, c), "bilinear", antialias=True)
        latents.append(vae.encode(x).mode() * scaling_factor)
    return tuple(latents)


class SubjectFusion(nnx.Module):
    """Pyramid latents -> one latent at the finest level's size (a 3x3 conv over the levels stacked on channels)."""

    def __init__(self, channels: int, levels: int, *, dtype=jnp.float32, rngs):
        self.levels = levels
        self.conv = conv2d(channels * levels, channels, 3, zero_init=True, dtype=dtype, rngs=rngs)
        # Identity on the finest level (the kernel's centre tap), zero elsewhere: starts as the single-scale latent.
        kernel = self.conv.kernel.get_value()
        self.conv.kernel.set_value(kernel.at[1, 1, :channels, :].set(jnp.eye(channels, dtype=kernel.dtype)))

    def __call__(self, latents: Sequence[jax.Array]) -> jax.Array:
        if len(latents) != self.levels:
            raise ValueError(f"subject fusion takes {self.levels} pyramid latents; got {len(latents)}")
        b, h, w, c = latents[0].shape
        up = [latents[0]] + [jax.image.resize(z, (b, h, w, c), "bilinear") for z in latents[1:]]
        return self.conv(jnp.concatenate(up, axis=-1).astype(self.conv.dtype))
