"""VideoCrafter1/2 `model.ckpt` files (AILab-CVC/VideoCrafter): the LDM numbered layout plus openaimodel3d's
temporal parts, in one file with every part.

Prefixes: the 3-D UNet `model.diffusion_model.`, the VAE `first_stage_model.`, the OpenCLIP text tower
`cond_stage_model.model.`, and for I2V the OpenCLIP image tower `embedder.model.` and the resampler
`image_proj_model.`. Upstream reads `ckpt['state_dict']`, or a DeepSpeed `ckpt['module']` whose keys carry a
`_forward_module.` prefix; both are accepted.
"""
from __future__ import annotations

from typing import Mapping

import ml_collections

from vdjax.convert import ldm
from vdjax.models import unet3d


def unet_config(params: Mapping) -> ml_collections.ConfigDict:
    """vdjax UNet3D config from openaimodel3d `UNetModel` kwargs (a VideoCrafter yaml's `unet_config.params`)."""
    p = dict(params)
    unsupported = {k: p[k] for k in ("tempspatial_aware", "use_scale_shift_norm", "resblock_updown") if p.get(k)}
    if p.get("temporal_attention", True) is False or not p.get("temporal_selfatt_only", True) or unsupported:
        raise ValueError("vdjax builds VideoCrafter's released UNets: temporal self-attention only, no "
                         f"scale-shift norm or resblock up/down sampling; got {unsupported or p}")
    if p.get("temporal_transformer_depth", 1) != p.get("transformer_depth", 1):
        raise ValueError("UNet3D has one transformer depth for spatial and temporal transformers; got "
                         f"{p.get('transformer_depth', 1)} and {p['temporal_transformer_depth']}")
    cfg = ldm.unet_config({**p, "use_linear_in_transformer": p.get("use_linear", False)})
    cfg.motion.update(kind="lvdm", transformer_layers=p.get("transformer_depth", 1), mid_block=True,
                      max_positions=p.get("temporal_length") or 0, norm_scope="clip",
                      relative_position=bool(p.get("use_relative_position", True)),
                      causal=bool(p.get("use_causal_attention", False)))
    cfg.update(image_cross_attention="lvdm_dual" if p.get("use_image_attention") else "none",
               fps_conditioning=bool(p.get("fps_cond", False)), init_attention=bool(p.get("addition_attention")),
               init_attention_heads=8, init_attention_head_dim=p.get("num_head_channels", 64),
               temporal_conv=bool(p.get("temporal_conv", False)))
    if cfg.init_attention and p.get("num_head_channels", -1) == -1:
        raise ValueError("init_attn needs num_head_channels (its head width), as every released config sets")
    unet3d.check_config(cfg)
    return cfg
