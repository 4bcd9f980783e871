"""OpenCLIP text and image towers as SD 2.x and VideoCrafter use them.

- `TextTower`: tokens -> token + position embeddings -> causal pre-LN transformer -> `ln_final`, all 77 token
  vectors; `layer='penultimate'` stops one block early (SD 2.x, VideoCrafter), `'last'` runs every block.
- `VisionTower`: VideoCrafter's image embedder: 224x224 pixels -> patches + class token + positions -> `ln_pre` ->
  transformer -> all 257 tokens of the last block (no `ln_post`, no projection).
- `videocrafter_preprocess`: images in [-1, 1] -> kornia's antialiased bicubic resize to 224 (aspect ignored)
  -> [0, 1] -> CLIP mean/std.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vdjax.layers.attention import Attention
from vdjax.layers.primitives import CONV_IN, CONV_OUT, EMBED, HIDDEN, InitKeys, axis_names, dense, gelu, layer_norm
from vdjax.models.imaging import kornia_resize, to_rgb
from vdjax.models.unet3d import DTYPES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def text_config(name: str = "vit_h14") -> ml_collections.ConfigDict:
    sizes = {"vit_h14": dict(width=1024, heads=16, layers=24), "tiny": dict(width=32, heads=4, layers=3)}
    if name not in sizes:
        raise ValueError(f"unknown OpenCLIP text tower {name!r}; choose one of {sorted(sizes)}")
    return ml_collections.ConfigDict(dict(vocab_size=49408, context_length=77, mlp_ratio=4, layer="penultimate",
                                          dtype="float32", **sizes[name]))


def vision_config(name: str = "vit_h14") -> ml_collections.ConfigDict:
    sizes = {"vit_h14": dict(width=1280, heads=16, layers=32), "tiny": dict(width=64, heads=4, layers=3)}
    if name not in sizes:
        raise ValueError(f"unknown OpenCLIP vision tower {name!r}; choose one of {sorted(sizes)}")
    return ml_collections.ConfigDict(dict(image_size=224, patch_size=14, mlp_ratio=4, dtype="float32",
                                          **sizes[name]))


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, *, dtype, rngs):
        self.c_fc = dense(width, hidden, (EMBED, HIDDEN), dtype=dtype, rngs=rngs)
        self.c_proj = dense(hidden, width, (HIDDEN, EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.c_proj(gelu(self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)) (exact GELU, LayerNorm eps 1e-5)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, *, dtype, rngs):
        self.ln_1 = layer_norm(width, dtype=dtype, rngs=rngs)
        self.attn = Attention(width, heads, width // heads, qkv_bias=True, dtype=dtype, rngs=rngs)
        self.ln_2 = layer_norm(width, dtype=dtype, rngs=rngs)
        self.mlp = MLP(width, width * mlp_ratio, dtype=dtype, rngs=rngs)

    def __call__(self, x, causal: bool = False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs):
        self.resblocks = nnx.List([ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio, dtype=dtype, rngs=rngs)
                                   for _ in range(cfg.layers)])

    def __call__(self, x, *, causal: bool = False, num_blocks: int | None = None):
        for block in self.resblocks[:num_blocks]:
            x = block(x, causal)
        return x


def _param(shape, axes, rngs, std=0.02):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), **axis_names(axes))


class TextTower(nnx.Module):
    def __init__(self, config: Any, *, rngs: nnx.Rngs | InitKeys):
        cfg = self.config = ml_collections.FrozenConfigDict(config)
        if cfg.layer not in ("penultimate", "last"):
            raise ValueError(f"OpenCLIP text layer {cfg.layer!r}; choose 'penultimate' or 'last'")
        dtype = self.dtype = DTYPES[cfg.dtype]
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.width, dtype=dtype, rngs=rngs,
                                         embedding_metadata=axis_names(("vocab", EMBED)))
        self.positional_embedding = _param((cfg.context_length, cfg.width), (None, EMBED), rngs)
        self.transformer = Transformer(cfg, dtype=dtype, rngs=rngs)
        self.ln_final = layer_norm(cfg.width, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, layer: str | None = None) -> jax.Array:
        """(N, context_length) token ids -> (N, context_length, width) float32, after `ln_final`."""
        cfg = self.config
        if tokens.ndim != 2 or tokens.shape[1] != cfg.context_length:
            raise ValueError(f"tokens must be (N, {cfg.context_length}); got shape {tuple(tokens.shape)} — "
                             "tokenise with vdjax.models.openclip_tokenizer.OpenCLIPTokenizer")
        layer = layer or cfg.layer
        x = self.token_embedding(tokens) + self.positional_embedding[...].astype(self.dtype)
        x = self.transformer(x, causal=True, num_blocks=cfg.layers - (layer == "penultimate"))
        return self.ln_final(x).astype(jnp.float32)


class VisionTower(nnx.Module):
    def __init__(self, config: Any, *, rngs: nnx.Rngs | InitKeys):
        cfg = self.config = ml_collections.FrozenConfigDict(config)
        dtype = self.dtype = DTYPES[cfg.dtype]
        p, grid = cfg.patch_size, cfg.image_size // cfg.patch_size
        self.conv1 = nnx.Conv(3, cfg.width, (p, p), strides=p, padding="VALID", use_bias=False, dtype=dtype,
                              kernel_metadata=axis_names((None, None, CONV_IN, CONV_OUT)), rngs=rngs)
        self.class_embedding = _param((cfg.width,), (EMBED,), rngs)
        self.positional_embedding = _param((grid * grid + 1, cfg.width), (None, EMBED), rngs)
        self.ln_pre = layer_norm(cfg.width, dtype=dtype, rngs=rngs)
        self.transformer = Transformer(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """(N, 224, 224, 3) normalised pixels -> (N, 1 + patches, width) float32 tokens of the last block."""
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"pixels must be (N, {cfg.image_size}, {cfg.image_size}, 3); got {tuple(pixels.shape)} "
                             "— use videocrafter_preprocess")
        x = self.conv1(pixels.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(self.dtype)
        return self.transformer(self.ln_pre(x)).astype(jnp.float32)


def videocrafter_preprocess(images: jax.Array, size: int = 224) -> jax.Array:
    """(N, H, W, C) in [-1, 1] -> (N, size, size, 3) as VideoCrafter's image embedder feeds its tower.

    Grayscale (C=1) is replicated and RGBA (C=4) loses its alpha, as PIL's convert('RGB')."""
    x = (kornia_resize(to_rgb(images, batched=True), (size, size)) + 1.0) / 2.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
