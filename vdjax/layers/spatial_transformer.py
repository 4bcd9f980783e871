"""The spatial transformer of SD's UNet (diffusers' `Transformer2DModel`), applied to every frame."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vdjax.layers.attention import (AdaptivePromptsAttention, Attention, DecoupledCrossAttention,
                                    FirstFrameAttention)
from vdjax.layers.embeddings import position_table
from vdjax.layers.primitives import EMBED, HIDDEN, GroupNorm, biased_dot, conv2d, dense, gelu, layer_norm


class FeedForward(nnx.Module):
    """GEGLU feed-forward: proj_in to 2 x (mult x dim), value * GELU(gate) (exact erf GELU), proj_out."""

    def __init__(self, dim: int, *, mult: int = 4, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        self.proj_in = dense(dim, 2 * inner, (EMBED, HIDDEN), dtype=dtype, rngs=rngs)
        self.proj_out = dense(inner, dim, (HIDDEN, EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(biased_dot(self.proj_in, x), 2, axis=-1)
        return self.proj_out(value * gelu(gate))


class BasicTransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention to the context, feed-forward; each with a residual.

    `image_split`: the cross-attention is decoupled into text and image tokens (see `DecoupledCrossAttention`):
    `{'text_tokens': 77}` as VideoCrafter's I2V model, `{'image_tokens': n}` as IP-Adapter; with
    `'adaptive': (alpha1, alpha2)` MagDiff's learnable weights (`AdaptivePromptsAttention`). `first_frame`: the
    self-attention gets I2V-Adapter's first-frame branch (`FirstFrameAttention`; `rotary`: with learned 2-D rotary
    positions in it). `temporal`: MagDiff's released block (videoassembler, after Tune-A-Video) with a temporal
    self-attention over each token's frames between the cross-attention and the feed-forward (`temp_norm`,
    `temp_attn`; its output projection starts at zero), and with `frame_positions` a sinusoid over the frames added
    to the stream before it."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, *, image_split: dict | None = None,
                 image_scale: float = 1.0, first_frame: bool = False, rotary: bool = False, temporal: bool = False,
                 frame_positions: bool = False, impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
        if first_frame:
            self.attn1 = FirstFrameAttention(dim, heads, head_dim, rotary=rotary, impl=impl, dtype=dtype, rngs=rngs)
        else:
            self.attn1 = Attention(dim, heads, head_dim, impl=impl, dtype=dtype, rngs=rngs)
        self.first_frame = first_frame
        self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
        if image_split and "adaptive" in image_split:
            alpha1, alpha2 = image_split["adaptive"]
            self.attn2 = AdaptivePromptsAttention(dim, heads, head_dim, context_dim=context_dim,
                                                  text_tokens=image_split["text_tokens"], text_scale=alpha1,
                                                  image_scale=alpha2, impl=impl, dtype=dtype, rngs=rngs)
        elif image_split:
            self.attn2 = DecoupledCrossAttention(dim, heads, head_dim, context_dim=context_dim, **image_split,
                                                 image_scale=image_scale, impl=impl, dtype=dtype, rngs=rngs)
        else:
            self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, impl=impl, dtype=dtype, rngs=rngs)
        self.temp_norm = layer_norm(dim, dtype=dtype, rngs=rngs) if temporal else None
        self.temp_attn = Attention(dim, heads, head_dim, impl=impl, dtype=dtype, rngs=rngs) if temporal else None
        if temporal:  # upstream zero-initialises its output projection: the block starts as the image block
            for p in (self.temp_attn.to_out.kernel, self.temp_attn.to_out.bias):
                p.set_value(jnp.zeros_like(p.get_value()))
        self.frame_positions = frame_positions
        self.norm3 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def _temporal(self, x: jax.Array, frames: int) -> jax.Array:
        """(B*F, T, dim) -> the same, with each token attending over its clip's frames."""
        n, tokens, dim = x.shape
        h = x.reshape(n // frames, frames, tokens, dim)
        if self.frame_positions:  # upstream adds it in place to the stream: it stays there, for one frame too
            h = h + jnp.asarray(position_table(frames, dim)[0, :, None], h.dtype)
        if frames > 1:  # upstream leaves single frames out of the temporal attention
            h = h.transpose(0, 2, 1, 3).reshape(-1, frames, dim)
            h = h + self.temp_attn(self.temp_norm(h))
            h = h.reshape(n // frames, tokens, frames, dim).transpose(0, 2, 1, 3)
        return h.reshape(x.shape)

    def __call__(self, x: jax.Array, context: jax.Array, *, num_frames: int | None = None,
                 width: int | None = None) -> jax.Array:
        """x: (B*F, T, dim) tokens of each frame (rows `width` tokens long); context: (B, S, context_dim), one per
        clip (or one per frame, then give `num_frames` for the first-frame and temporal attentions' clips)."""
        clips = context.shape[0]
        if self.first_frame:
            x = x + self.attn1(self.norm1(x), clips=x.shape[0] // num_frames if num_frames else clips, width=width)
        else:
            x = x + self.attn1(self.norm1(x))
        # Cross-attention queries of all frames of a clip share its context: attend per clip, so that the
        # context's keys and values are projected once per clip instead of once per frame.
        h = self.norm2(x).reshape(clips, -1, x.shape[-1])
        x = x + self.attn2(h, context).reshape(x.shape)
        if self.temp_attn is not None:
            x = self._temporal(x, num_frames or x.shape[0] // clips)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nnx.Module):
    """GroupNorm -> proj_in (1x1 conv, or linear for SD 2.x) -> transformer blocks -> proj_out, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, *, num_layers: int = 1, groups: int = 32,
                 use_linear_projection: bool = False, image_split: dict | None = None, image_scale: float = 1.0,
                 first_frame: bool = False, rotary: bool = False, temporal: bool = False,
                 frame_positions: bool = False, impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        if channels % heads:
            raise ValueError(f"spatial transformer: {channels} channels do not split into {heads} heads")
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype, rngs=rngs)
        project = ((lambda: dense(channels, channels, (EMBED, HIDDEN), dtype=dtype, rngs=rngs))
                   if use_linear_projection else (lambda: conv2d(channels, channels, 1, dtype=dtype, rngs=rngs)))
        self.proj_in = project()
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, image_split=image_split,
                                  image_scale=image_scale, first_frame=first_frame, rotary=rotary, temporal=temporal,
                                  frame_positions=frame_positions, impl=impl, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)])
        self.proj_out = project()

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: (B*F, H, W, C) -> same shape."""
        n, hgt, wid, c = x.shape
        h = self.proj_in(self.norm(x)).reshape(n, hgt * wid, c)  # a 1x1 conv and a linear act alike here
        for block in self.transformer_blocks:
            h = block(h, context, width=wid)
        return x + self.proj_out(h.reshape(n, hgt, wid, c))
