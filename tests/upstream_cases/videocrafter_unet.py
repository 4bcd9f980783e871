"""VideoCrafter's openaimodel3d UNetModel (t2v 1024/512, i2v 512, VideoCrafter2 512 flags, tiny sizes) vs UNet3D
with motion.kind='lvdm', loaded from the released key names."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from vdjax.convert import ldm, videocrafter
from vdjax.convert.keymap import load_params
from vdjax.layers.primitives import InitKeys
from vdjax.models.unet3d import UNet3D


def build(case: Case) -> UNet3D:
    unet = UNet3D(videocrafter.unet_config(case.meta["constructor_kwargs"]), rngs=InitKeys(0))
    load_params(unet, case.weights(), ldm.unet_key(unet.config), source=str(case.path))  # strict: every key used
    return unet


def run(case: Case) -> dict[str, float]:
    io = case.io()
    unet = build(case)
    to_last = lambda x: jnp.asarray(x).transpose(0, 2, 3, 4, 1)  # (b, c, t, h, w) -> (b, t, h, w, c)
    out = unet(to_last(io["x"]), jnp.asarray(io["timesteps"]), jnp.asarray(io["context"]),
               fps=jnp.asarray(io["fps"]) if "fps" in io else None)
    errors = {"y": max_abs_error(np.asarray(out).transpose(0, 4, 1, 2, 3), io["y"])}
    assert errors["y"] <= tolerance(io["y"]), errors
    return errors
