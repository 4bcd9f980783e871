"""Stable Diffusion's KL autoencoder (diffusers' `AutoencoderKL`), channels-last, with chunked video encode/decode.

Images are `(N, H, W, 3)` in [-1, 1]; latents `(N, H/f, W/f, latent_channels)` with f = 2^(levels-1). Videos
`(B, F, H, W, C)` are processed `chunk_size` frames at a time under `jax.lax.map`, so peak memory follows the
chunk, not the clip; the result equals processing all frames at once.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vdjax.layers.attention import Attention
from vdjax.layers.primitives import GroupNorm, InitKeys, conv2d
from vdjax.layers.resnet import Downsample, ResnetBlock, Upsample
from vdjax.models.unet3d import DTYPES


def base_config() -> ml_collections.ConfigDict:
    """The SD 1.x/2.x VAE (`stabilityai/sd-vae-ft-mse` and the one inside SD 1.5 / 2.1)."""
    return ml_collections.ConfigDict(dict(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        scaling_factor=0.18215,  # latents for the UNet are posterior samples times this
        chunk_size=4,  # frames per chunk in encode_video/decode_video
        dtype="float32",
    ))


def tiny_config() -> ml_collections.ConfigDict:
    cfg = base_config()
    cfg.update(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    return cfg


class MidAttention(Attention):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual (diffusers' VAE layout)."""

    def __init__(self, channels: int, *, groups: int, dtype, rngs):
        super().__init__(channels, 1, channels, qkv_bias=True, dtype=dtype, rngs=rngs)
        self.group_norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        return x + super().__call__(self.group_norm(x).reshape(n, h * w, c)).reshape(x.shape)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, *, groups: int, dtype, rngs):
        resnet = lambda: ResnetBlock(channels, channels, None, groups=groups, eps=1e-6, dtype=dtype, rngs=rngs)
        self.resnets = nnx.List([resnet(), resnet()])
        self.attentions = nnx.List([MidAttention(channels, groups=groups, dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Level(nnx.Module):
    """One resolution of the encoder (resnets then downsampler) or the decoder (resnets then upsampler)."""

    def __init__(self, in_ch, out_ch, layers, *, groups, resample, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, None, groups=groups, eps=1e-6,
                                             dtype=dtype, rngs=rngs) for j in range(layers)])
        self.downsampler = (Downsample(out_ch, asymmetric=True, dtype=dtype, rngs=rngs)
                            if resample == "down" else None)
        self.upsampler = Upsample(out_ch, dtype=dtype, rngs=rngs) if resample == "up" else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for resample in (self.downsampler, self.upsampler):
            if resample is not None:
                x = resample(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs):
        ch, g, n = tuple(cfg.block_out_channels), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = conv2d(cfg.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups=g,
                                           resample="down" if i < n - 1 else None, dtype=dtype, rngs=rngs)
                                     for i in range(n)])
        self.mid_block = MidBlock(ch[-1], groups=g, dtype=dtype, rngs=rngs)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=1e-6, dtype=dtype, rngs=rngs)
        self.conv_out = conv2d(ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs):
        ch, g, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = conv2d(cfg.latent_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(ch[0], groups=g, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups=g,
                                         resample="up" if i < n - 1 else None, dtype=dtype, rngs=rngs)
                                   for i in range(n)])
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=1e-6, dtype=dtype, rngs=rngs)
        self.conv_out = conv2d(ch[-1], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Posterior:
    """Diagonal Gaussian over latents from the encoder's moments (log-variance clamped to [-30, 20])."""

    def __init__(self, moments: jax.Array):
        self.mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        self.logvar = jnp.clip(logvar, -30.0, 20.0)
        self.std = jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class AutoencoderKL(nnx.Module):
    def __init__(self, config: Any, *, rngs: nnx.Rngs | InitKeys):
        cfg = self.config = ml_collections.FrozenConfigDict(config)
        dtype = self.dtype = DTYPES[cfg.dtype]
        c = 2 * cfg.latent_channels
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.quant_conv = conv2d(c, c, 1, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)
        self.post_quant_conv = conv2d(cfg.latent_channels, cfg.latent_channels, 1, dtype=dtype, rngs=rngs)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _check(self, shape, channels, what, factor):
        if len(shape) != 4 or shape[-1] != channels:
            raise ValueError(f"{what} must be (N, H, W, {channels}) channels-last; got shape {tuple(shape)}")
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(f"{what} size {shape[1]}x{shape[2]} is not divisible by {factor}; the VAE takes sizes "
                             f"in multiples of {factor}")

    def encode(self, images: jax.Array) -> Posterior:
        """(N, H, W, 3) in [-1, 1] -> posterior over (N, H/f, W/f, latent_channels)."""
        self._check(images.shape, self.config.in_channels, "images", self.downsampling_factor)
        return Posterior(self.quant_conv(self.encoder(images.astype(self.dtype))))

    def decode(self, latents: jax.Array) -> jax.Array:
        """(N, h, w, latent_channels) unscaled latents -> (N, h*f, w*f, 3), float32, roughly [-1, 1]."""
        self._check(latents.shape, self.config.latent_channels, "latents", 1)
        return self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)

    def _per_frame(self, fn, video: jax.Array, chunk_size: int | None) -> jax.Array:
        b, f = video.shape[:2]
        frames = video.reshape(b * f, *video.shape[2:])
        chunk = chunk_size or self.config.chunk_size
        out = jax.lax.map(lambda x: fn(x[None])[0], frames, batch_size=min(chunk, b * f))
        return out.reshape(b, f, *out.shape[1:])

    def encode_video(self, video: jax.Array, *, chunk_size: int | None = None) -> jax.Array:
        """(B, F, H, W, 3) -> the posterior moments (B, F, h, w, 2*latent_channels) chunk by chunk;
        wrap them in `Posterior` for mean/std/sample."""
        if video.ndim != 5:
            raise ValueError(f"video must be (batch, frames, height, width, 3); got shape {tuple(video.shape)}")
        return self._per_frame(lambda x: self.quant_conv(self.encoder(x.astype(self.dtype))), video, chunk_size)

    def decode_video(self, latents: jax.Array, *, chunk_size: int | None = None) -> jax.Array:
        """(B, F, h, w, latent_channels) unscaled latents -> (B, F, H, W, 3), chunk_size frames at a time."""
        if latents.ndim != 5:
            raise ValueError(f"latents must be (batch, frames, h, w, channels); got shape {tuple(latents.shape)}")
        return self._per_frame(self.decode, latents, chunk_size)
