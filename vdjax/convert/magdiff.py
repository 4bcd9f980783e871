"""MagDiff's starting point: VideoCrafter I2V 512's released model.ckpt, with MagDiff's new parameters at their
initial values (MagDiff publishes no weights; training starts here).

    python launch/convert.py --config=configs/magdiff.py --model=i2v_512_v1/model.ckpt --output=models/magdiff_init
    python launch/train.py --config=configs/magdiff.py --checkpoint=models/magdiff_init --workdir=runs/magdiff

The file is read as the VideoCrafter I2V model of the same size (SD 2.1-base UNet with LVDM temporal layers, its
image cross-attention's to_k_ip/to_v_ip, OpenCLIP text and image towers, the Resampler, the VAE). MagDiff adds:
conv_in's subject input channels (zero: the base's output is unchanged), APA's alpha1/alpha2 (config.unet.apa_scales)
and the HFA fusion conv (the identity on the finest level).
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from vdjax.layers.primitives import InitKeys
from vdjax.models.subject import SubjectFusion
from vdjax.models.unet3d import abstract_unet

APA_SCALES = ("text_cross_attention_scale", "image_cross_attention_scale")


def base_config(config) -> ml_collections.ConfigDict:
    """The VideoCrafter I2V config whose files a MagDiff config starts from (same sizes, no MagDiff parts)."""
    base = config.copy_and_resolve_references()
    base.family = "videocrafter"
    base.variant = ("tiny_" if str(config.variant).startswith("tiny") else "") + "i2v_512_v1"
    base.unet.image_cross_attention = "lvdm_dual"
    base.unet.subject.update(channels=0, scales=(1.0,))
    return base


def from_base_unet(config, base_unet: nnx.Module) -> nnx.Module:
    """The MagDiff UNet holding `base_unet`'s weights (VideoCrafter I2V's), the new parameters at their init."""
    model = abstract_unet(config.unet)
    base = dict(nnx.to_flat_state(nnx.state(base_unet, nnx.Param)))
    u = config.unet
    fusion = (nnx.state(SubjectFusion(u.subject.channels, len(u.subject.scales), rngs=InitKeys(0)), nnx.Param)
              if len(u.subject.scales) > 1 else None)
    fusion = dict(nnx.to_flat_state(fusion)) if fusion is not None else {}
    values = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path == ("conv_in", "kernel"):  # base channels, then the subject's at zero
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
