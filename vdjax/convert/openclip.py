"""OpenCLIP tower layout (`cond_stage_model.model.*` text, `embedder.model.visual.*` image in VideoCrafter files;
`cond_stage_model.model.*` in SD 2.x single files)."""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from vdjax.convert.keymap import path_to_key, rename, torch_leaf

RENAMES = (
    (r"\.token_embedding\.embedding$", ".token_embedding.weight"),
    (r"\.attn\.to_out\.", ".attn.out_proj."),
    (r"\.attn\.to_([qkv])\.", r".attn.in_proj_\1."),  # split from the packed in_proj by `unpack_in_proj`
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


def unpack_in_proj(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """nn.MultiheadAttention packs q, k, v into `in_proj_weight (3D, D)` / `in_proj_bias (3D,)`: split them."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"(.*\.attn\.)in_proj_(weight|bias)$", key)
        if m is None:
            out[key] = value
            continue
        for name, part in zip("qkv", np.split(np.asarray(value), 3, axis=0)):
            out[f"{m.group(1)}in_proj_{name}.{m.group(2)}"] = part
    return out
