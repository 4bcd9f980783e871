"""MagDiff's starting point: VideoCrafter I2V 512's released model.ckpt, with MagDiff's new parameters at their
initial values (MagDiff publishes no weights; training starts here). Also the UNet layout of MagDiff's released code
(`temporal=videoassembler`, see `videoassembler_unet`).

    python launch/convert.py --config=configs/magdiff.py --model=i2v_512_v1/model.ckpt --output=models/magdiff_init
    python launch/train.py --config=configs/magdiff.py --checkpoint=models/magdiff_init --workdir=runs/magdiff

The file is read as the VideoCrafter I2V model of the same size (SD 2.1-base UNet with LVDM temporal layers, its
image cross-attention's to_k_ip/to_v_ip, OpenCLIP text and image towers, the Resampler, the VAE). MagDiff adds:
conv_in's subject input channels (zero: the base's output is unchanged), APA's alpha1/alpha2 (config.unet.apa_scales)
and the HFA fusion conv (the identity on the finest level). In the released code's layout the file's LVDM temporal
transformers, init_attn and fps embedding have no place; its other parameters (the 2-D UNet, the temporal convs, the
image cross-attention) are kept and the in-block temporal attentions start at their init (output projection zero), as
upstream starts them on SD 2.1-base.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vdjax.layers.primitives import InitKeys
from vdjax.models.subject import SubjectFusion
from vdjax.models.unet3d import UNet3D, abstract_unet

APA_SCALES = ("text_cross_attention_scale", "image_cross_attention_scale")


# The released code's UNet (gulucaptain/videoassembler, configs/_meta_/inference.yaml) against VideoCrafter I2V 512's
# of the same sizes: a temporal self-attention inside every spatial transformer block with a sinusoid over the frames
# (add_temp_embed), the temporal convs (add_temp_conv), GroupNorm over the clip in the resnets (ResnetBlock3D), and
# no temporal transformers, init_attn or fps conditioning. Same parameter names as upstream (temp_attn, temp_norm).
_VIDEOASSEMBLER = dict(motion=dict(kind="videoassembler", frame_positions=True), init_attention=False,
                       fps_conditioning=False, resnet_norm_scope="clip")
_VIDEOCRAFTER_I2V = dict(motion=dict(kind="lvdm", frame_positions=False), init_attention=True, fps_conditioning=True,
                         resnet_norm_scope="frame")


def _with(unet: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
    unet = unet.copy_and_resolve_references()
    unet.update(values)  # recursive: the nested motion options only
    return unet


def videoassembler_unet(unet: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """VideoCrafter I2V 512's UNet config (MagDiff's default start) -> the released code's layout, same sizes."""
    return _with(unet, _VIDEOASSEMBLER)


def base_config(config) -> ml_collections.ConfigDict:
    """The VideoCrafter I2V config whose files a MagDiff config starts from (same sizes, no MagDiff parts)."""
    base = config.copy_and_resolve_references()
    base.family = "videocrafter"
    base.variant = ("tiny_" if str(config.variant).startswith("tiny") else "") + "i2v_512_v1"
    if base.unet.motion.kind == "videoassembler":
        base.unet = _with(base.unet, _VIDEOCRAFTER_I2V)
    base.unet.image_cross_attention = "lvdm_dual"
    base.unet.subject.update(channels=0, scales=(1.0,))
    return base


def _temporal_attention_init(unet_config) -> dict:
    """{'a/b/...': initial value} of the in-block temporal attentions: the whole model's init traced and compiled,
    so XLA computes only these (a full-size model is never drawn in memory)."""
    def init():
        state = nnx.state(UNet3D(unet_config, rngs=InitKeys(0)), nnx.Param)
        return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)
                if "temp_attn" in p or "temp_norm" in p}
    return jax.jit(init)()


def from_base_unet(config, base_unet: nnx.Module) -> nnx.Module:
    """The MagDiff UNet holding `base_unet`'s weights (VideoCrafter I2V's), the new parameters at their init."""
    model = abstract_unet(config.unet)
    base = dict(nnx.to_flat_state(nnx.state(base_unet, nnx.Param)))
    u = config.unet
    fusion = (nnx.state(SubjectFusion(u.subject.channels, len(u.subject.scales), rngs=InitKeys(0)), nnx.Param)
              if len(u.subject.scales) > 1 else None)
    fusion = dict(nnx.to_flat_state(fusion)) if fusion is not None else {}
    # The in-block temporal attentions (released layout) are new: their init values.
    fresh = _temporal_attention_init(config.unet) if u.motion.kind == "videoassembler" else {}
    values = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if (key := "/".join(map(str, path))) in fresh:
            values[path] = fresh[key]
        elif path == ("conv_in", "kernel"):  # base channels, then the subject's at zero
            old = base[path].get_value()
            values[path] = jnp.zeros(var.shape, var.dtype).at[:, :, :old.shape[2]].set(old)
        elif path[-1] in APA_SCALES:
            values[path] = jnp.full(var.shape, u.apa_scales[APA_SCALES.index(path[-1])], var.dtype)
        elif path[0] == "subject_fusion":
            values[path] = fusion[path[1:]].get_value()
        else:
            values[path] = base[path].get_value()
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(values[path])
    nnx.update(model, state)
    return model
