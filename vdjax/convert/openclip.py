"""OpenCLIP tower layout (`cond_stage_model.model.*` text, `embedder.model.visual.*` image in VideoCrafter files;
`cond_stage_model.model.*` in SD 2.x single files)."""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from vdjax.convert.keymap import path_to_key, rename, torch_leaf
from vdjax.convert.readers import LazyStateDict, rewrite

RENAMES = (
    (r"\.token_embedding\.embedding$", ".token_embedding.weight"),
    (r"\.attn\.to_out\.", ".attn.out_proj."),
    (r"\.attn\.to_([qkv])\.", r".attn.in_proj_\1."),  # split from the packed in_proj by `split_in_proj`
)
# What the towers vdjax runs never read: the other tower's leftovers, the pooled-output projections.
# Anchored at the tower's root (`...model.`), so that e.g. `visual.positional_embedding` is not taken for the
# text side's `positional_embedding`.
TEXT_UNUSED = re.compile(r"(^|model\.)(text_projection|logit_scale|visual\..*)$")
VISION_UNUSED = re.compile(r"(^|model\.)(token_embedding\.weight|positional_embedding|ln_final\.\w+|text_projection|"
                           r"logit_scale|visual\.ln_post\.\w+|visual\.proj)$")


def text_key(prefix: str = "cond_stage_model.model."):
    return lambda path: prefix + torch_leaf(rename("." + path_to_key(path), RENAMES))[1:]


def vision_key(prefix: str = "embedder.model."):
    return lambda path: prefix + "visual." + torch_leaf(rename("." + path_to_key(path), RENAMES))[1:]


def split_in_proj(state_dict: Mapping) -> LazyStateDict:
    """nn.MultiheadAttention packs q, k, v into `attn.in_proj_weight (3D, D)` / `in_proj_bias (3D,)`: split them
    into `in_proj_{q,k,v}.*`, lazily (nothing is read until a tensor is asked for)."""
    def fn(key, shape):
        if m := re.match(r"(.*\.attn\.)in_proj_(weight|bias)$", key):
            part = (shape[0] // 3, *shape[1:])
            return [(f"{m[1]}in_proj_{q}.{m[2]}", part, lambda v, i=i: np.split(v, 3, axis=0)[i])
                    for i, q in enumerate("qkv")]
    return rewrite(state_dict, fn)
