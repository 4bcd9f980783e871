"""Image projections that turn image-encoder features into cross-attention context tokens.

- `Resampler`: the perceiver resampler (open_flamingo's, as copied by VideoCrafter's `ip_resampler.py` and
  IP-Adapter's `resampler.py`). `num_queries` learned latents attend, `depth` times, to the projected image tokens
  together with themselves, then `proj_out` and `norm_out`. VideoCrafter I2V feeds it all 257 tokens of the
  OpenCLIP ViT-H/14 visual transformer (`vdjax.models.openclip.VisionTower`); IP-Adapter-Plus feeds it the
  penultimate hidden states of the HF CLIP vision model.
- `ImageProjModel`: plain IP-Adapter (and VideoCrafter's non-`finegrained` option): one pooled CLIP image embedding
  -> Linear -> `tokens` x `cross_attention_dim` -> LayerNorm.

Parameter tree (vdjax path -> upstream key, after `image_proj_key`'s prefix):
  latents                      -> latents           (1, num_queries, dim), stored alike
  proj_in / proj_out / norm_out -> same names
  layers.{i}.attn.{norm1,norm2,to_q,to_kv,to_out} -> layers.{i}.0.*
  layers.{i}.ff.norm / fc1 / fc2 -> layers.{i}.1.0 / 1.1 / 1.3   (1.2 is the parameter-free GELU)
  ImageProjModel: proj, norm   -> same names
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vdjax.convert.keymap import path_to_key, rename, torch_leaf
from vdjax.layers.primitives import EMBED, HEADS, HIDDEN, InitKeys, axis_names, dense, gelu, layer_norm
from vdjax.models.unet3d import DTYPES

VIDEOCRAFTER_PREFIX = "image_proj_model."  # LatentVisualDiffusion.image_proj_model in a VideoCrafter model.ckpt
IP_ADAPTER_PREFIX = "image_proj."          # IP-Adapter .safetensors; the .bin's state_dict['image_proj'] has none

# Upstream Resampler kwargs (IP-Adapter's superset of VideoCrafter's) and their upstream defaults.
_UPSTREAM_DEFAULTS = dict(dim=1024, depth=8, dim_head=64, heads=16, num_queries=8, embedding_dim=768,
                          output_dim=1024, ff_mult=4, max_seq_len=257, apply_pos_emb=False,
                          num_latents_mean_pooled=0)

RESAMPLER_PRESETS = {
    # configs/inference_i2v_512_v1.0.yaml (finegrained: true) -> LatentVisualDiffusion.init_projector.
    "videocrafter_i2v": dict(dim=1024, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280,
                             output_dim=1024, ff_mult=4),
    # ip_adapter.py:IPAdapterPlus.init_proj with SD 1.5 (cross_attention_dim 768) and the ViT-H/14 image encoder.
    "ip_adapter_plus_sd15": dict(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280,
                                 output_dim=768, ff_mult=4),
    # Test size (the videocrafter_resampler fixture's): heads * dim_head != dim, as in the VideoCrafter release.
    "tiny": dict(dim=32, depth=2, dim_head=8, heads=3, num_queries=4, embedding_dim=40, output_dim=24, ff_mult=4),
}

IMAGE_PROJ_PRESETS = {
    # ip_adapter.py:IPAdapter.init_proj with SD 1.5 and the ViT-H/14 image encoder (projection_dim 1024).
    "ip_adapter_sd15": dict(cross_attention_dim=768, clip_embeddings_dim=1024, clip_extra_context_tokens=4),
    "tiny": dict(cross_attention_dim=32, clip_embeddings_dim=48, clip_extra_context_tokens=4),
}


def _config(kind: str, presets: dict, defaults: dict, name: str | None, kwargs: dict) -> ml_collections.ConfigDict:
    if name is not None and name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; choose one of {sorted(presets)} (or None for the "
                         "upstream class defaults), and pass the upstream keyword arguments to change it")
    unknown = sorted(set(kwargs) - set(defaults) - {"dtype"})
    if unknown:
        raise ValueError(f"{kind}: unknown argument(s) {unknown}; the upstream keyword arguments are "
                         f"{sorted(defaults)}, plus dtype (one of {sorted(DTYPES)})")
    values = {**defaults, **(presets[name] if name else {}), "dtype": "float32", **kwargs}
    if values["dtype"] not in DTYPES:
        raise ValueError(f"{kind}: dtype {values['dtype']!r}; choose one of {sorted(DTYPES)}")
    return ml_collections.ConfigDict(values)


def resampler_config(name: str | None = "videocrafter_i2v", **kwargs) -> ml_collections.ConfigDict:
    """A `Resampler` config: the preset `name` (None: upstream's class defaults) updated with upstream's keyword
    arguments (`dim`, `depth`, `dim_head`, `heads`, `num_queries`, `embedding_dim`, `output_dim`, `ff_mult`,
    `max_seq_len`, `apply_pos_emb`, `num_latents_mean_pooled`) and `dtype` (compute dtype, 'float32' default)."""
    return _config("Resampler", RESAMPLER_PRESETS, _UPSTREAM_DEFAULTS, name, kwargs)


def image_proj_config(name: str | None = "ip_adapter_sd15", **kwargs) -> ml_collections.ConfigDict:
    """An `ImageProjModel` config: preset `name` (None: upstream's defaults) updated with upstream's keyword
    arguments (`cross_attention_dim`, `clip_embeddings_dim`, `clip_extra_context_tokens`) and `dtype`."""
    defaults = dict(cross_attention_dim=1024, clip_embeddings_dim=1024, clip_extra_context_tokens=4)
    return _config("ImageProjModel", IMAGE_PROJ_PRESETS, defaults, name, kwargs)


def image_proj_key(path: tuple, prefix: str = VIDEOCRAFTER_PREFIX) -> str:
    """The upstream checkpoint key of a `Resampler` or `ImageProjModel` parameter path.

    `prefix`: `VIDEOCRAFTER_PREFIX` ('image_proj_model.', VideoCrafter model.ckpt), `IP_ADAPTER_PREFIX`
    ('image_proj.', IP-Adapter .safetensors) or '' (the .bin's `state_dict['image_proj']`). For `load_params`,
    bind it: `functools.partial(image_proj_key, prefix=...)`."""
    renames = ((r"\.attn\.", ".0."), (r"\.ff\.norm\.", ".1.0."), (r"\.ff\.fc1\.", ".1.1."), (r"\.ff\.fc2\.", ".1.3."))
    return prefix + torch_leaf(rename("." + path_to_key(path), renames))[1:]


class PerceiverAttention(nnx.Module):
    """Latents attend to concat(image tokens, latents): norm1 on x, norm2 on the latents, q from the latents,
    k and v from one packed `to_kv` (first half k); no biases. q and k are each scaled by dim_head**-0.25 before
    q k^T (upstream's fp16-friendly split of the usual 1/sqrt(dim_head)); softmax in float32."""

    def __init__(self, dim: int, dim_head: int, heads: int, *, dtype, rngs: nnx.Rngs | InitKeys):
        inner = dim_head * heads
        self.heads, self.dim_head, self.dtype = heads, dim_head, dtype
        self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.to_q = dense(dim, inner, (EMBED, HEADS), use_bias=False, dtype=dtype, rngs=rngs)
        self.to_kv = dense(dim, 2 * inner, (EMBED, HEADS), use_bias=False, dtype=dtype, rngs=rngs)
        self.to_out = dense(inner, dim, (HEADS, EMBED), use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        """x: (B, N, dim) image tokens; latents: (B, Q, dim) -> (B, Q, dim)."""
        x, latents = self.norm1(x), self.norm2(latents)
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.dim_head)  # heads-major, as upstream's view
        q = split(self.to_q(latents))
        k, v = map(split, jnp.split(self.to_kv(jnp.concatenate([x, latents], axis=1)), 2, axis=-1))
        scale = self.dim_head ** -0.25
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k * scale, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return self.to_out(out.reshape(*out.shape[:-2], -1))


class FeedForward(nnx.Module):
    """LayerNorm -> Linear (no bias) -> exact GELU -> Linear (no bias); upstream's nn.Sequential indices 0, 1, 3."""

    def __init__(self, dim: int, mult: float, *, dtype, rngs: nnx.Rngs | InitKeys):
        inner = int(dim * mult)
        self.norm = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.fc1 = dense(dim, inner, (EMBED, HIDDEN), use_bias=False, dtype=dtype, rngs=rngs)
        self.fc2 = dense(inner, dim, (HIDDEN, EMBED), use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(self.norm(x))))


class PerceiverBlock(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs | InitKeys):
        self.attn = PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        latents = self.attn(x, latents) + latents
        return self.ff(latents) + latents


class Resampler(nnx.Module):
    """(B, N, embedding_dim) image-encoder tokens -> (B, num_queries, output_dim) float32 context tokens."""

    def __init__(self, config: Any, *, rngs: nnx.Rngs | InitKeys):
        cfg = self.config = ml_collections.FrozenConfigDict(config)
        if cfg.apply_pos_emb or cfg.num_latents_mean_pooled:
            raise NotImplementedError(
                f"Resampler: apply_pos_emb={cfg.apply_pos_emb}, num_latents_mean_pooled={cfg.num_latents_mean_pooled}"
                " (IP-Adapter's learned token positions / mean-pooled latents) are not built: no released "
                "VideoCrafter or IP-Adapter(-Plus) SD 1.5 checkpoint uses them. Set apply_pos_emb=False and "
                "num_latents_mean_pooled=0 (the upstream defaults).")
        for field in ("dim", "depth", "dim_head", "heads", "num_queries", "embedding_dim", "output_dim"):
            if not isinstance(cfg[field], int) or cfg[field] < 1:
                raise ValueError(f"Resampler: {field} must be a positive integer; got {cfg[field]!r}")
        if int(cfg.dim * cfg.ff_mult) < 1:
            raise ValueError(f"Resampler: ff_mult={cfg.ff_mult!r} gives an empty feed-forward layer")
        dtype = self.dtype = DTYPES[cfg.dtype]
        init = jax.random.normal(rngs.params(), (1, cfg.num_queries, cfg.dim), jnp.float32) / cfg.dim ** 0.5
        self.latents = nnx.Param(init, **axis_names((None, None, EMBED)))
        self.proj_in = dense(cfg.embedding_dim, cfg.dim, (None, EMBED), dtype=dtype, rngs=rngs)
        self.layers = nnx.List([PerceiverBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.proj_out = dense(cfg.dim, cfg.output_dim, (EMBED, None), dtype=dtype, rngs=rngs)
        self.norm_out = layer_norm(cfg.output_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if x.ndim != 3 or x.shape[-1] != cfg.embedding_dim:
            raise ValueError(
                f"Resampler input must be (batch, tokens, {cfg.embedding_dim}); got shape {tuple(x.shape)}. "
                "VideoCrafter I2V feeds every token of the OpenCLIP ViT-H/14 VisionTower output (257 x 1280); "
                "IP-Adapter-Plus the CLIP vision model's penultimate hidden states (257 x 1280).")
        x = self.proj_in(x.astype(self.dtype))
        latents = jnp.broadcast_to(self.latents[...].astype(self.dtype), (x.shape[0], *self.latents.shape[1:]))
        for block in self.layers:
            latents = block(x, latents)
        return self.norm_out(self.proj_out(latents)).astype(jnp.float32)


class ImageProjModel(nnx.Module):
    """(B, clip_embeddings_dim) pooled CLIP image embeddings -> (B, tokens, cross_attention_dim) float32:
    Linear (with bias), reshape token-major (token t reads output columns t*X:(t+1)*X), LayerNorm."""

    def __init__(self, config: Any, *, rngs: nnx.Rngs | InitKeys):
        cfg = self.config = ml_collections.FrozenConfigDict(config)
        dtype = self.dtype = DTYPES[cfg.dtype]
        self.proj = dense(cfg.clip_embeddings_dim, cfg.clip_extra_context_tokens * cfg.cross_attention_dim,
                          (None, EMBED), dtype=dtype, rngs=rngs)
        self.norm = layer_norm(cfg.cross_attention_dim, dtype=dtype, rngs=rngs)

    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        cfg = self.config
        if image_embeds.ndim != 2 or image_embeds.shape[-1] != cfg.clip_embeddings_dim:
            raise ValueError(
                f"ImageProjModel input must be (batch, {cfg.clip_embeddings_dim}) pooled image embeddings (the CLIP "
                f"vision model's projected image_embeds); got shape {tuple(image_embeds.shape)}")
        y = self.proj(image_embeds.astype(self.dtype))
        y = y.reshape(y.shape[0], cfg.clip_extra_context_tokens, cfg.cross_attention_dim)
        return self.norm(y).astype(jnp.float32)
