"""One configurable 3-D UNet for every family: SD's image UNet plus temporal layers.

Video latents are channels-last `(batch, frames, height, width, channels)`. Spatial layers see the frames
folded into the batch `(batch*frames, h, w, c)`; temporal layers attend over the frames at each pixel.
With `motion.kind='none'` and one frame this is the Stable Diffusion image UNet.

The configuration (an `ml_collections.ConfigDict`; see `configs/animatediff_sd15.py`, `configs/videocrafter.py`)
names the family's parts; options that later issues build are declared and refused with `NotImplementedError`
until then.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vdjax.layers.embeddings import TimestepEmbedding, timestep_sinusoid
from vdjax.layers.primitives import GroupNorm, InitKeys, conv2d
from vdjax.layers.resnet import Downsample, ResnetBlock, Upsample
from vdjax.layers.spatial_transformer import SpatialTransformer
from vdjax.layers.temporal import TemporalConvBlock, TemporalTransformer
from vdjax.models.subject import SubjectFusion

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Declared options that are not built yet, and the issue that brings each.
_NOT_YET: dict = {}  # (option, value) -> the issue that builds it; empty while every declared option is built
_CHOICES = {
    "motion.kind": ("none", "animatediff", "lvdm", "videoassembler"),
    "motion.norm_scope": ("frame", "clip"),
    "resnet_norm_scope": ("frame", "clip"),
    "image_cross_attention": ("none", "lvdm_dual", "ip_adapter", "magdiff_apa"),
    "dtype": tuple(DTYPES),
}


def base_config() -> ml_collections.ConfigDict:
    """Every UNet option, at the values of the Stable Diffusion 1.5 image UNet (no temporal layers)."""
    return ml_collections.ConfigDict(dict(
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        attention_levels=(True, True, True, False),  # spatial transformers per level (mid block always has one)
        num_attention_heads=(8, 8, 8, 8),  # per level; head width = channels / heads
        layers_per_block=2,
        transformer_layers=1,
        cross_attention_dim=768,
        use_linear_projection=False,  # SD 2.x: True
        norm_num_groups=32,
        norm_eps=1e-5,
        resnet_norm_scope="frame",  # 'clip': AnimateDiff v1's GroupNorm over all frames of a clip
        flip_sin_to_cos=True,
        freq_shift=0,
        motion=dict(
            # 'animatediff': a motion module after every resnet (+ spatial transformer) of every level;
            # 'lvdm': VideoCrafter's temporal transformer after every spatial transformer (its heads);
            # 'videoassembler': MagDiff's released UNet, a temporal self-attention inside every spatial transformer
            # block, between its cross-attention and feed-forward (the spatial heads).
            kind="none",
            num_attention_heads=8,  # animatediff only
            transformer_layers=1,
            max_positions=32,  # animatediff: sinusoid table length (v1: 24); lvdm: relative-position reach
            mid_block=False,
            norm_scope="frame",  # 'clip': diffusers' AnimateDiffTransformer3D normalises over all frames
            relative_position=False,  # lvdm: learned relative-position tables in temporal attention
            causal=False,  # lvdm: frame i attends to frames 0..i only
            frame_positions=False,  # videoassembler: a sinusoid over the frames added before it (add_temp_embed)
        ),
        # Decoupled image cross-attention (image tokens with their own key/value, added with a scale):
        # 'lvdm_dual': VideoCrafter I2V, image tokens after `text_context_tokens` text tokens;
        # 'ip_adapter': IP-Adapter / I2V-Adapter, the last `image_context_tokens` tokens are image tokens;
        # 'magdiff_apa': MagDiff's APA, like 'lvdm_dual' with learnable weights starting at apa_scales.
        image_cross_attention="none",
        apa_scales=(1.0, 1.5),
        text_context_tokens=77,
        image_context_tokens=16,
        image_attention_scale=1.0,
        first_frame_attention=False,  # I2V-Adapter: every spatial self-attention also attends to frame 0
        # I2V with a clean frame 0 (first_frame_attention): that frame's latent also enters every frame as
        # in_channels more input channels of conv_in, zero-initialised (a model widened from one without them
        # starts as it was); what pixel-aligned conditioning (VideoCrafter2/DynamiCrafter-style concat) gives.
        first_frame_concat=False,
        # I2V (first_frame_attention): learned 2-D rotary positions in the first-frame branch, zero at init (not in
        # I2V-Adapter; see vdjax.layers.attention.FirstFrameAttention): looking a given offset away in frame 0.
        first_frame_rotary=False,
        fps_conditioning=False,  # VideoCrafter: fps through the sinusoid and its own MLP, added to temb
        init_attention=False,  # VideoCrafter's init_attn: a temporal transformer right after conv_in
        init_attention_heads=8,
        init_attention_head_dim=64,
        temporal_conv=False,  # VideoCrafter: a 4-layer (3, 1, 1) temporal conv after every resnet
        # MagDiff's High-Fidelity Alignment: `channels` > 0 widens conv_in by that many zero-initialised input
        # channels for the subject latent (one per `scales` level, fused; see vdjax.models.subject).
        subject=dict(channels=0, scales=(1.0,)),
        dtype="float32",  # compute dtype; parameters are always float32
        attention_impl="auto",  # see vdjax.layers.attention.IMPLEMENTATIONS
    ))


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def check_config(cfg) -> None:
    """Refuse a configuration the UNet cannot build, saying which option and what it accepts."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ValueError(f"unet config: {key}={_get(cfg, key)!r}; choose one of {choices}")
    for (key, value), issue in _NOT_YET.items():
        if _get(cfg, key) == value:
            raise NotImplementedError(f"unet config: {key}={value!r} is declared but not built yet; "
                                      f"it arrives with issue {issue}.")
    if cfg.first_frame_rotary and not cfg.first_frame_attention:
        raise ValueError("unet config: first_frame_rotary turns the first-frame attention's queries and keys; it "
                         "needs first_frame_attention=True")
    if cfg.first_frame_concat and not cfg.first_frame_attention:
        raise ValueError("unet config: first_frame_concat reads frame 0 as the clean input frame, which only an I2V "
                         "UNet with first_frame_attention=True (its sampler holds frame 0) has; set both or neither")
    levels = len(cfg.block_out_channels)
    for key in ("attention_levels", "num_attention_heads"):
        if len(cfg[key]) != levels:
            raise ValueError(f"unet config: {key} has {len(cfg[key])} entries for {levels} levels "
                             f"(block_out_channels={tuple(cfg.block_out_channels)}); give one per level.")


class DownBlock(nnx.Module):
    def __init__(self, cfg, in_ch: int, out_ch: int, temb: int, level: int, last: bool, *, dtype, rngs):
        n = cfg.layers_per_block
        self.resnets = nnx.List([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, temb, groups=cfg.norm_num_groups,
                                             eps=cfg.norm_eps, norm_scope=cfg.resnet_norm_scope, dtype=dtype, rngs=rngs)
                                 for j in range(n)])
        self.temporal_convs = _temporal_convs(cfg, out_ch, n, dtype, rngs)
        self.attentions = _transformers(cfg, out_ch, level, n, dtype, rngs) if cfg.attention_levels[level] else None
        self.motion_modules = _motion_modules(cfg, out_ch, n, level, dtype, rngs)
        self.downsampler = None if last else Downsample(out_ch, dtype=dtype, rngs=rngs)

    def __call__(self, h, temb, context, num_frames, remat=None):
        skips = []
        for j in range(len(self.resnets)):
            h = _checkpointed(_layer(j, num_frames), remat, self, h, temb, context)
            skips.append(h)
        if self.downsampler is not None:
            h = self.downsampler(h)
            skips.append(h)
        return h, skips


class MidBlock(nnx.Module):
    def __init__(self, cfg, ch: int, temb: int, *, dtype, rngs):
        resnet = lambda: ResnetBlock(ch, ch, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                                     norm_scope=cfg.resnet_norm_scope, dtype=dtype, rngs=rngs)
        self.resnets = nnx.List([resnet(), resnet()])
        self.temporal_convs = _temporal_convs(cfg, ch, 2, dtype, rngs)
        last = len(cfg.block_out_channels) - 1
        self.attentions = _transformers(cfg, ch, last, 1, dtype, rngs)
        self.motion_modules = _motion_modules(cfg, ch, 1, last, dtype, rngs, mid=True) if cfg.motion.mid_block else None

    def __call__(self, h, temb, context, num_frames, remat=None):
        def block(mid, h, temb, context):
            h = _layer(0, num_frames)(mid, h, temb, context)
            h = mid.resnets[1](h, temb)
            return h if mid.temporal_convs is None else mid.temporal_convs[1](h, num_frames)
        return _checkpointed(block, remat, self, h, temb, context)


class UpBlock(nnx.Module):
    def __init__(self, cfg, prev_ch: int, out_ch: int, skip_in_ch: int, temb: int, level: int, last: bool, *,
                 dtype, rngs):
        n = cfg.layers_per_block + 1
        # The last resnet of a level takes the skip from before that level's downsampler (skip_in_ch wide).
        self.resnets = nnx.List([
            ResnetBlock((prev_ch if j == 0 else out_ch) + (skip_in_ch if j == n - 1 else out_ch), out_ch, temb,
                        groups=cfg.norm_num_groups, eps=cfg.norm_eps, norm_scope=cfg.resnet_norm_scope,
                        dtype=dtype, rngs=rngs) for j in range(n)])
        self.temporal_convs = _temporal_convs(cfg, out_ch, n, dtype, rngs)
        self.attentions = _transformers(cfg, out_ch, level, n, dtype, rngs) if cfg.attention_levels[level] else None
        self.motion_modules = _motion_modules(cfg, out_ch, n, level, dtype, rngs)
        self.upsampler = None if last else Upsample(out_ch, dtype=dtype, rngs=rngs)

    def __call__(self, h, temb, context, num_frames, skips, remat=None):
        for j in range(len(self.resnets)):
            h = _checkpointed(_layer(j, num_frames), remat, self, jnp.concatenate([h, skips.pop()], axis=-1), temb,
                              context)
        return h if self.upsampler is None else self.upsampler(h)


def _transformers(cfg, ch, level, n, dtype, rngs):
    return nnx.List([SpatialTransformer(ch, cfg.num_attention_heads[level], cfg.cross_attention_dim,
                                        num_layers=cfg.transformer_layers, groups=cfg.norm_num_groups,
                                        use_linear_projection=cfg.use_linear_projection,
                                        image_split=_image_split(cfg), image_scale=cfg.image_attention_scale,
                                        first_frame=cfg.first_frame_attention,
                                        rotary=cfg.first_frame_rotary,
                                        temporal=cfg.motion.kind == "videoassembler",
                                        frame_positions=cfg.motion.frame_positions, impl=cfg.attention_impl,
                                        dtype=dtype, rngs=rngs) for _ in range(n)])


def _image_split(cfg) -> dict | None:
    return {"lvdm_dual": {"text_tokens": cfg.text_context_tokens},
            "ip_adapter": {"image_tokens": cfg.image_context_tokens},
            "magdiff_apa": {"text_tokens": cfg.text_context_tokens, "adaptive": tuple(cfg.apa_scales)},
            }.get(cfg.image_cross_attention)


def _motion_modules(cfg, ch, n, level, dtype, rngs, *, mid=False):
    m = cfg.motion
    if m.kind in ("none", "videoassembler") or (m.kind == "lvdm" and not (mid or cfg.attention_levels[level])):
        return None  # lvdm: only after spatial transformers (the middle block always has one); videoassembler: in them
    if m.kind == "lvdm":  # heads as the spatial transformer it follows; projections as its (linear or conv)
        make = lambda: TemporalTransformer(
            ch, cfg.num_attention_heads[level], num_layers=m.transformer_layers, max_positions=0,
            relative_positions=m.max_positions if m.relative_position else 0, causal=m.causal,
            groups=cfg.norm_num_groups, norm_scope="clip", conv_projections=not cfg.use_linear_projection,
            impl=cfg.attention_impl, dtype=dtype, rngs=rngs)
    else:
        make = lambda: TemporalTransformer(ch, m.num_attention_heads, num_layers=m.transformer_layers,
                                           max_positions=m.max_positions, groups=cfg.norm_num_groups,
                                           norm_scope=m.norm_scope, impl=cfg.attention_impl, dtype=dtype, rngs=rngs)
    return nnx.List([make() for _ in range(n)])


def _temporal_convs(cfg, ch, n, dtype, rngs):
    if not cfg.temporal_conv:
        return None
    released = cfg.motion.kind == "videoassembler"  # MagDiff's released temporal convs leave single images alone
    return nnx.List([TemporalConvBlock(ch, groups=cfg.norm_num_groups, images_unchanged=released, dtype=dtype,
                                       rngs=rngs) for _ in range(n)])


def _apply(block, j, h, context, num_frames):
    """After the j-th resnet of a block (where present): its temporal conv, spatial transformer, temporal one."""
    if block.temporal_convs is not None:
        h = block.temporal_convs[j](h, num_frames)
    if block.attentions is not None:
        h = block.attentions[j](h, context)
    if block.motion_modules is not None:
        h = block.motion_modules[j](h, num_frames)
    return h


def _layer(j, num_frames):
    """A block's j-th layer as a function of the block: resnet, then _apply's temporal conv and transformers."""
    return lambda block, h, temb, context: _apply(block, j, block.resnets[j](h, temb), context, num_frames)


def _checkpointed(layer, remat, *args):
    """layer(*args), its activations recomputed in the backward pass under the jax.checkpoint policy `remat` (None:
    stored). One layer (resnet + transformers) at a time, as diffusers' gradient checkpointing: a checkpoint around
    the whole UNet would recompute the forward pass and then hold all of it for the backward pass anyway. No graph
    updates: the layers change no state, and a Trainer's frozen parameters belong to an outer trace."""
    return layer(*args) if remat is None else nnx.remat(layer, policy=remat, graph_updates=False)(*args)


def abstract_unet(config: Any) -> "UNet3D":
    """The model with `ShapeDtypeStruct` parameters (no memory, no compute): for shapes, shardings and loading."""
    return nnx.eval_shape(lambda: UNet3D(config, rngs=InitKeys(0)))


ADDABLE = ("first_frame_concat", "first_frame_rotary")  # options a saved UNet can gain, starting as it was


def with_added_options(unet: "UNet3D", config: Any) -> "UNet3D":
    """`unet` as the UNet `config` describes: the same but with some of ADDABLE switched on. The same weights; what
    is new starts at zero (conv_in's frame-0 input channels, the rotary frequencies), so the new model computes
    exactly what `unet` did."""
    model = abstract_unet(config)
    old = dict(nnx.to_flat_state(nnx.state(unet, nnx.Param)))
    state = nnx.state(model, nnx.Param)
    c = config.in_channels
    for path, var in nnx.to_flat_state(state):
        if path not in old:  # a new parameter (the rotary frequencies)
            var.set_value(jnp.zeros(var.shape, var.dtype))
            continue
        value = old[path].get_value()
        if value.shape != var.shape and path == ("conv_in", "kernel"):  # input channels: the sample's, then frame
            zeros = jnp.zeros((*value.shape[:2], c, value.shape[3]), value.dtype)  # 0's (new), then a subject's
            value = jnp.concatenate([value[:, :, :c], zeros, value[:, :, c:]], axis=2)
        var.set_value(value)
    nnx.update(model, state)
    return model


class UNet3D(nnx.Module):
    def __init__(self, config: Any, *, rngs: nnx.Rngs | InitKeys):
        check_config(config)
        cfg = self.config = ml_collections.FrozenConfigDict(config)  # hashable: part of the static graph
        dtype = self.dtype = DTYPES[cfg.dtype]
        chans = tuple(cfg.block_out_channels)
        temb = chans[0] * 4
        levels = len(chans)
        subject = cfg.subject.channels
        extra = subject + (cfg.in_channels if cfg.first_frame_concat else 0)
        self.conv_in = conv2d(cfg.in_channels + extra, chans[0], 3, dtype=dtype, rngs=rngs)
        if extra:  # the first frame's and the subject's input channels start at zero: the model starts as its base
            kernel = self.conv_in.kernel.get_value()
            self.conv_in.kernel.set_value(kernel.at[:, :, cfg.in_channels:].set(0))
        self.subject_fusion = (SubjectFusion(subject, len(cfg.subject.scales), dtype=dtype, rngs=rngs)
                               if subject and len(cfg.subject.scales) > 1 else None)
        self.time_embedding = TimestepEmbedding(chans[0], temb, dtype=dtype, rngs=rngs)
        self.fps_embedding = (TimestepEmbedding(chans[0], temb, dtype=dtype, rngs=rngs)
                              if cfg.fps_conditioning else None)
        m = cfg.motion  # VideoCrafter's init_attn: conv projections, heads x head width independent of channels
        self.init_attention = (TemporalTransformer(
            chans[0], cfg.init_attention_heads, head_dim=cfg.init_attention_head_dim,
            num_layers=cfg.transformer_layers, max_positions=0,
            relative_positions=m.max_positions if m.relative_position else 0, causal=m.causal,
            groups=cfg.norm_num_groups, norm_scope="clip", conv_projections=True, impl=cfg.attention_impl,
            dtype=dtype, rngs=rngs) if cfg.init_attention else None)
        self.down_blocks = nnx.List([
            DownBlock(cfg, chans[max(i - 1, 0)], chans[i], temb, i, i == levels - 1, dtype=dtype, rngs=rngs)
            for i in range(levels)])
        self.mid_block = MidBlock(cfg, chans[-1], temb, dtype=dtype, rngs=rngs)
        # Up blocks run from the deepest level back to the first.
        self.up_blocks = nnx.List([
            UpBlock(cfg, chans[min(lvl + 1, levels - 1)], chans[lvl], chans[max(lvl - 1, 0)], temb, lvl, lvl == 0,
                    dtype=dtype, rngs=rngs)
            for lvl in reversed(range(levels))])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, chans[0], eps=cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.conv_out = conv2d(chans[0], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def check_inputs(self, sample_shape, context_shape) -> None:
        """Raise a ValueError naming what the UNet can take; shapes only, so it runs at trace time."""
        cfg, f = self.config, self.downsampling_factor
        if len(sample_shape) != 5:
            raise ValueError("sample must be (batch, frames, height, width, channels); got shape "
                             f"{tuple(sample_shape)}")
        b, frames, h, w, c = sample_shape
        if c != cfg.in_channels:
            raise ValueError(f"sample has {c} channels; this UNet takes {cfg.in_channels} (channels-last layout)")
        if h % f or w % f:
            raise ValueError(f"latent size {h}x{w} is not divisible by the UNet's downsampling factor {f}; use "
                             f"multiples of {f} (e.g. {max(f, h - h % f)}x{max(f, w - w % f)}), i.e. images in "
                             f"multiples of {8 * f} px with an 8x VAE.")
        m = cfg.motion
        if m.kind == "animatediff" and m.max_positions and frames > m.max_positions:
            raise ValueError(f"{frames} frames exceed the motion module's position table; this model takes 1 to "
                             f"{m.max_positions} frames.")
        if len(context_shape) != 3 or context_shape[0] != b or context_shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"context must be (batch={b}, tokens, {cfg.cross_attention_dim}); got shape "
                             f"{tuple(context_shape)}")
        if cfg.image_cross_attention in ("lvdm_dual", "magdiff_apa") and context_shape[1] <= cfg.text_context_tokens:
            raise ValueError(f"this image-to-video UNet takes {cfg.text_context_tokens} text tokens followed by the "
                             f"image tokens as context; got {context_shape[1]} tokens")
        if cfg.image_cross_attention == "ip_adapter" and context_shape[1] <= cfg.image_context_tokens:
            raise ValueError(f"this UNet's IP-Adapter attention takes text tokens followed by "
                             f"{cfg.image_context_tokens} image tokens as context; got {context_shape[1]} tokens")

    def subject_latent(self, subject) -> jax.Array:
        """The subject's pyramid latents ((B, h_s, w_s, C) per scale) -> the (B, h, w, C) latent conv_in sees."""
        levels = len(self.config.subject.scales)
        if not isinstance(subject, (tuple, list)) or len(subject) != levels:
            raise ValueError(f"subject must be {levels} latent(s), one per pyramid scale "
                             f"{tuple(self.config.subject.scales)} (vdjax.models.subject.encode_pyramid)")
        return subject[0] if self.subject_fusion is None else self.subject_fusion(subject)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array,
                 fps: jax.Array | None = None, subject=None, remat: Callable | None = None) -> jax.Array:
        """sample (B, F, H, W, C_in), timesteps (B,) or scalar, context (B, S, D), fps (B,) or scalar (models with
        fps conditioning), subject (MagDiff: the subject image's pyramid latents, see `subject_latent`)
        -> (B, F, H, W, C_out) float32. `remat`: a jax.checkpoint policy (e.g. jax.checkpoint_policies
        .nothing_saveable) under which each layer's activations are recomputed in the backward pass (training)."""
        self.check_inputs(sample.shape, context.shape)
        b, frames, hgt, wid, _ = sample.shape
        cfg = self.config
        if cfg.first_frame_concat:  # frame 0 is the clean input frame: every frame sees it, pixel-aligned
            sample = jnp.concatenate([sample, jnp.broadcast_to(sample[:, :1], sample.shape)], axis=-1)
        if cfg.subject.channels:
            if subject is None:
                raise ValueError("this UNet is conditioned on a subject image (MagDiff HFA): pass subject= (its "
                                 "pyramid latents, vdjax.models.subject.encode_pyramid)")
            z = self.subject_latent(subject)
            if z.shape != (b, hgt, wid, cfg.subject.channels):
                raise ValueError(f"subject latent {z.shape} does not match the sample's (batch, h, w) = "
                                 f"{(b, hgt, wid)}")
            sample = jnp.concatenate([sample, jnp.broadcast_to(z[:, None], (b, frames, *z.shape[1:]))], axis=-1)
        elif subject is not None:
            raise ValueError("this UNet has no subject input (unet.subject.channels = 0)")
        sinusoid = lambda t: timestep_sinusoid(jnp.broadcast_to(jnp.asarray(t), (b,)), cfg.block_out_channels[0],
                                               flip_sin_to_cos=cfg.flip_sin_to_cos,
                                               freq_shift=cfg.freq_shift).astype(self.dtype)
        temb = self.time_embedding(sinusoid(timesteps))
        if self.fps_embedding is not None:
            if fps is None:
                raise ValueError("this UNet is conditioned on the video's frame rate: pass fps (e.g. the config's "
                                 "sample.fps)")
            temb = temb + self.fps_embedding(sinusoid(fps))
        context = context.astype(self.dtype)
        h = self.conv_in(sample.reshape(b * frames, hgt, wid, -1).astype(self.dtype))
        if self.init_attention is not None:
            h = self.init_attention(h, frames)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context, frames, remat)
            skips += block_skips
        h = self.mid_block(h, temb, context, frames, remat)
        for block in self.up_blocks:
            h = block(h, temb, context, frames, skips, remat)
        if cfg.resnet_norm_scope == "clip":
            h = self.conv_norm_out(h.reshape(b, -1, h.shape[-1])).reshape(h.shape)
        else:
            h = self.conv_norm_out(h)
        h = self.conv_out(jax.nn.silu(h))
        return h.reshape(b, frames, hgt, wid, -1).astype(jnp.float32)
