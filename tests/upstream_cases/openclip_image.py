"""VideoCrafter's FrozenOpenCLIPImageEmbedderV2 (open_clip 2.22 + kornia) vs vdjax's preprocessing and VisionTower."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from vdjax.convert.keymap import load_params
from vdjax.convert.openclip import VISION_UNUSED, split_in_proj, vision_key
from vdjax.models.openclip import VisionTower, videocrafter_preprocess, vision_config
from vdjax.models.imaging import kornia_resize
from vdjax.layers.primitives import InitKeys

nchw = lambda x: np.asarray(x).transpose(0, 3, 1, 2)


def run(case: Case) -> dict[str, float]:
    meta, io = case.meta, case.io()
    vision = meta["model_config"]["vision_cfg"]
    cfg = vision_config("tiny")
    cfg.update(width=vision["width"], layers=vision["layers"], heads=vision["width"] // vision.get("head_width", 64),
               patch_size=vision["patch_size"], image_size=vision["image_size"])
    tower = VisionTower(cfg, rngs=InitKeys(0))
    load_params(tower, split_in_proj(case.weights()), vision_key(meta.get("key_prefix", "embedder.model.")),
                ignore=VISION_UNUSED.search, source=str(case.path))
    images = jnp.asarray(io["images"].transpose(0, 2, 3, 1))
    size = (cfg.image_size, cfg.image_size)
    ours = {
        "resized_224": nchw(kornia_resize(images, size)),
        "pixel_values_224": nchw(videocrafter_preprocess(images, cfg.image_size)),
        "z_from_pixel_values_224": tower(jnp.asarray(io["pixel_values_224"].transpose(0, 2, 3, 1))),
        "z": tower(videocrafter_preprocess(images, cfg.image_size)),
    }
    errors = {}
    for name, value in ours.items():
        if name in io:
            errors[name] = max_abs_error(value, io[name])
            assert errors[name] <= tolerance(io[name]), errors
    return errors
