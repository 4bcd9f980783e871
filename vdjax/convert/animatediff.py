"""The original AnimateDiff motion-module layout (mm_sd_v15.ckpt, mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt)."""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from vdjax.convert.diffusers import unet_key
from vdjax.convert.keymap import Path, rename
from vdjax.convert.readers import shape_of

MOTION_RENAMES = (
    (r"(motion_modules\.\d+\.|^)(norm|proj_in|proj_out|transformer_blocks)\.", r"\1temporal_transformer.\2."),
    (r"\.attn1\.", ".attention_blocks.0."),
    (r"\.attn2\.", ".attention_blocks.1."),
    (r"\.norm1\.", ".norms.0."),
    (r"\.norm2\.", ".norms.1."),
    (r"\.norm3\.", ".ff_norm."),
)
POSITION_TABLE = re.compile(r"\.pos_encoder\.pe$")


def motion_key(path: Path) -> str:
    """vdjax motion-module parameter path (within the UNet, or within one module) -> released checkpoint key."""
    return rename(unet_key(path), MOTION_RENAMES)


def is_motion_param(path: Path) -> bool:
    return "motion_modules" in path


def check_position_tables(state_dict: Mapping[str, np.ndarray], max_positions: int, source: str) -> None:
    """The released files carry their sinusoidal tables; their length tells v1 (24) from v2/v3 (32)."""
    lengths = {shape_of(state_dict, k)[1] for k in state_dict if POSITION_TABLE.search(k)}  # no tensor read
    if lengths and lengths != {max_positions}:
        raise ValueError(f"{source}: position tables of length {sorted(lengths)}, but the config's motion module "
                         f"has {max_positions} positions; a 24-long table is AnimateDiff v1, 32 is v2/v3 — pick the "
                         "matching variant.")
