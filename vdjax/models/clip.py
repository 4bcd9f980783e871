"""CLIP encoders in the Hugging Face (transformers) layout: SD 1.5's text tower and IP-Adapter's image tower.

- `CLIPTextModel`: token + position embeddings, pre-LN transformer with a causal mask, `final_layer_norm`.
  `skip=k` returns the hidden state k layers before the last, through `final_layer_norm` ("clip skip").
- `CLIPVisionModelWithProjection`: patch embedding + class token + positions, `pre_layrnorm` (HF's spelling),
  transformer, `post_layernorm` on the class token, `visual_projection` -> `image_embeds`; also the
  penultimate layer's output (no norm), which IP-Adapter-plus feeds its resampler.
- `clip_preprocess`: CLIP's image preprocessing in JAX (see its docstring for how it differs from HF's PIL path).

Attribute names follow transformers' (`encoder.layers.0.self_attn.q_proj`, ...), so `vdjax.convert.hf_clip` is a
prefix and a few renames. Inputs are channels-last; parameters float32; `config.dtype` is the compute dtype; the
outputs are float32.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vdjax.layers.attention import attention
from vdjax.layers.primitives import EMBED, HEADS, HIDDEN, InitKeys, axis_names, dense, gelu, layer_norm
from vdjax.models.imaging import to_rgb
from vdjax.models.unet3d import DTYPES

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's approximation
    "gelu": gelu,                                            # transformers' "gelu" is the exact erf form
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _shared(**over) -> dict:
    base = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_impl="auto", dtype="float32")
    base.update(over)
    return base


def text_config(name: str = "vit_l14") -> ml_collections.ConfigDict:
    """'vit_l14': SD 1.5's text encoder (openai/clip-vit-large-patch14's text tower); 'tiny': for tests.

    Field names are transformers' `CLIPTextConfig` names. `eos_token_id=2` is the value in SD 1.5's (legacy)
    config, for which transformers pools at argmax(input_ids); other values pool at the first such token.
    `with_projection` adds `text_projection` (transformers' `CLIPTextModelWithProjection`, e.g. SDXL's second
    encoder); SD 1.5 uses none.
    """
    configs = {
        "vit_l14": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768),
        "tiny": dict(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=16, projection_dim=24),
    }
    if name not in configs:
        raise ValueError(f"unknown CLIP text config {name!r}; choose one of {sorted(configs)}")
    return ml_collections.ConfigDict(_shared(**configs[name], eos_token_id=2, with_projection=False))


def vision_config(name: str = "vit_h14") -> ml_collections.ConfigDict:
    """'vit_h14': the OpenCLIP ViT-H/14 image encoder IP-Adapter uses; 'tiny': for tests.

    Field names are transformers' `CLIPVisionConfig` names.
    """
    configs = {
        "vit_h14": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                        image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
        "tiny": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                     image_size=16, patch_size=4, projection_dim=24, hidden_act="gelu"),
    }
    if name not in configs:
        raise ValueError(f"unknown CLIP vision config {name!r}; choose one of {sorted(configs)}")
    return ml_collections.ConfigDict(_shared(**configs[name], num_channels=3))


def _check_config(cfg) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype {cfg.dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    if "image_size" in cfg and cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")


def _table(count: int, features: int, *, dtype, rngs) -> nnx.Embed:
    """An embedding table (count, features); the count axis stays unsharded."""
    return nnx.Embed(count, features, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                     embedding_init=nnx.initializers.normal(0.02), embedding_metadata=axis_names((None, EMBED)))


class CLIPAttention(nnx.Module):
    """Self-attention with biased q/k/v/out projections."""

    def __init__(self, cfg, *, dtype, rngs):
        d = cfg.hidden_size
        self.heads, self.impl = cfg.num_attention_heads, cfg.attention_impl
        self.q_proj = dense(d, d, (EMBED, HEADS), dtype=dtype, rngs=rngs)
        self.k_proj = dense(d, d, (EMBED, HEADS), dtype=dtype, rngs=rngs)
        self.v_proj = dense(d, d, (EMBED, HEADS), dtype=dtype, rngs=rngs)
        self.out_proj = dense(d, d, (HEADS, EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = attention(q, k, v, causal=causal, impl=self.impl)
        return self.out_proj(out.reshape(x.shape))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs):
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, (EMBED, HIDDEN), dtype=dtype, rngs=rngs)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, (HIDDEN, EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs):
        norm = lambda: layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.layer_norm1, self.self_attn = norm(), CLIPAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2, self.mlp = norm(), CLIPMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, causal: bool):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, causal: bool) -> list[jax.Array]:
        """All hidden states as transformers numbers them: [input, after layer 1, ..., after the last layer].

        Under jit, states (and layers) whose results are not used are removed by XLA, so this costs nothing extra.
        """
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], causal))
        return states


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs):
        self.token_embedding = _table(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = _table(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids):
        return self.token_embedding(input_ids) + self.position_embedding.embedding[:input_ids.shape[-1]].astype(
            self.token_embedding.dtype)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array       # (B, T, D): after final_layer_norm (of the layer `skip` picks)
    pooler_output: jax.Array           # (B, D): last layer's normed state at the EOS token, as transformers
    text_embeds: jax.Array | None      # (B, projection_dim) with `with_projection`, else None


class CLIPTextModel(nnx.Module):
    """transformers' `CLIPTextModel` (or `CLIPTextModelWithProjection` with `config.with_projection`)."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs | InitKeys):
        _check_config(config)
        cfg = self.config = ml_collections.FrozenConfigDict(config)
        dtype = self.dtype = DTYPES[cfg.dtype]
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        if cfg.with_projection:
            self.text_projection = dense(cfg.hidden_size, cfg.projection_dim, (EMBED, None), use_bias=False,
                                         dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, *, skip: int = 0) -> CLIPTextOutput:
        """input_ids: (B, T) integer tokens, T <= max_position_embeddings (77 for SD 1.5's tokenizer output)."""
        cfg = self.config
        shape = getattr(input_ids, "shape", ())
        if len(shape) != 2 or shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids must be (batch, tokens) with tokens <= {cfg.max_position_embeddings}; "
                             f"got shape {tuple(shape)}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer token ids; got dtype {input_ids.dtype}")
        if not isinstance(skip, int) or not 0 <= skip < cfg.num_hidden_layers:
            raise ValueError(f"skip must be an int in [0, {cfg.num_hidden_layers - 1}]; got {skip!r}")
        states = self.encoder(self.embeddings(input_ids), causal=True)
        last = self.final_layer_norm(states[-1])
        # Legacy configs (eos_token_id == 2) pool at the highest id, which is the EOS token in CLIP's vocabulary;
        # newer ones at the first occurrence of eos_token_id (padding may repeat it).
        eos = (jnp.argmax(input_ids, axis=-1) if cfg.eos_token_id == 2
               else jnp.argmax(input_ids == cfg.eos_token_id, axis=-1))
        pooled = last[jnp.arange(shape[0]), eos]
        hidden = self.final_layer_norm(states[-1 - skip]) if skip else last
        embeds = self.text_projection(pooled).astype(jnp.float32) if cfg.with_projection else None
        return CLIPTextOutput(hidden.astype(jnp.float32), pooled.astype(jnp.float32), embeds)


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs):
        d, p = cfg.hidden_size, cfg.patch_size
        self.dtype = dtype
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), jnp.float32) * d ** -0.5,
                                         **axis_names((EMBED,)))
        # Non-overlapping patches, no bias (transformers' Conv2d(bias=False)).
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, (p, p), strides=p, padding="VALID", use_bias=False,
                                        dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                                        kernel_metadata=axis_names((None, None, None, EMBED)))
        self.position_embedding = _table((cfg.image_size // p) ** 2 + 1, d, dtype=dtype, rngs=rngs)

    def __call__(self, pixels):
        patches = self.patch_embedding(pixels.astype(self.dtype))
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])  # row-major, as torch's flatten(2)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (patches.shape[0], 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...].astype(self.dtype)


class CLIPVisionOutput(NamedTuple):
    image_embeds: jax.Array                # (B, projection_dim): visual_projection(post_layernorm(class token))
    last_hidden_state: jax.Array           # (B, 1 + patches, D): last layer's output, no norm
    penultimate_hidden_state: jax.Array    # (B, 1 + patches, D): transformers' hidden_states[-2], no norm
    pooler_output: jax.Array               # (B, D): post_layernorm(class token)


class CLIPVisionModelWithProjection(nnx.Module):
    """transformers' `CLIPVisionModelWithProjection` over channels-last pixels (B, S, S, C), normalised as CLIP."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs | InitKeys):
        _check_config(config)
        cfg = self.config = ml_collections.FrozenConfigDict(config)
        dtype = self.dtype = DTYPES[cfg.dtype]
        norm = lambda: layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = norm()
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.post_layernorm = norm()
        self.visual_projection = dense(cfg.hidden_size, cfg.projection_dim, (EMBED, None), use_bias=False,
                                       dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        shape = tuple(getattr(pixel_values, "shape", ()))
        if len(shape) != 4 or shape[1:] != want:
            raise ValueError(f"pixel_values must be channels-last (batch, {', '.join(map(str, want))}); got shape "
                             f"{shape}. Use clip_preprocess() to resize, crop and normalise images.")
        states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), causal=False)
        pooled = self.post_layernorm(states[-1][:, 0])
        f32 = lambda t: t.astype(jnp.float32)
        return CLIPVisionOutput(f32(self.visual_projection(pooled)), f32(states[-1]), f32(states[-2]), f32(pooled))


def clip_preprocess(image, size: int = 224) -> jax.Array:
    """One image -> CLIP's normalised (size, size, 3) float32 input, channels-last.

    Accepts (H, W) or (H, W, 1) grayscale (replicated to RGB), (H, W, 3) RGB and (H, W, 4) RGBA (alpha dropped,
    as PIL's convert('RGB') does). Integer images are scaled by 1/255; float images are taken as already in [0, 1].
    Steps as transformers' `CLIPImageProcessor`: resize so the shorter side is `size` (longer side
    int(size * long / short)), bicubic; centre crop; normalise with CLIP's mean and std.

    Differs from transformers' PIL path only in the resize: this is JAX's antialiased bicubic in float (clipped to
    [0, 1]), PIL's works on 8-bit values and rounds, so resized pixels differ by about one grey level (a few 1e-2
    after normalisation). Images already at size x size are not resampled, and then the output equals HF's exactly.
    """
    x = to_rgb(image)
    x = x.astype(jnp.float32) / 255.0 if jnp.issubdtype(x.dtype, jnp.integer) else x.astype(jnp.float32)
    h, w = x.shape[:2]
    short, long = min(h, w), max(h, w)
    long_out = int(size * long / short)
    out = (size, long_out) if h <= w else (long_out, size)
    if out != (h, w):
        x = jnp.clip(jax.image.resize(x, (*out, 3), method="bicubic", antialias=True), 0.0, 1.0)
    top, left = (out[0] - size) // 2, (out[1] - size) // 2
    x = x[top:top + size, left:left + size]
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)
