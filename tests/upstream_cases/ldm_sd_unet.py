"""Stable Diffusion's original openaimodel `UNetModel` (Stability-AI/stablediffusion) vs vdjax's UNet3D with no
temporal layers and one frame, weights in the LDM single-file layout (`model.diffusion_model.*`)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from vdjax.convert.ldm import load_unet, unet_config
from vdjax.layers.embeddings import timestep_sinusoid
from vdjax.layers.primitives import InitKeys
from vdjax.models.unet3d import UNet3D


def run(case: Case) -> dict[str, float]:
    io = case.io()
    cfg = unet_config(case.meta["constructor_kwargs"])
    model = nnx.eval_shape(lambda: UNet3D(cfg, rngs=InitKeys(0)))  # every parameter comes from the file
    load_unet(model, case.weights(), source=str(case.path))
    nchw = lambda a: np.moveaxis(np.asarray(a), -1, 1)  # channels-last -> the reference's NCHW
    x = jnp.asarray(np.moveaxis(io["x"], 1, -1))[:, None]  # (B, C, H, W) -> (B, F=1, H, W, C)
    t, ctx = jnp.asarray(io["timesteps"]), jnp.asarray(io["context"])
    ours = {"out": nchw(model(x, t, ctx)[:, 0])}
    # The debugging intermediates, computed with the UNet's own modules in the order its __call__ runs them.
    sinusoid = timestep_sinusoid(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                 freq_shift=cfg.freq_shift)
    temb = model.time_embedding(sinusoid)
    ours.update(temb_sinusoidal=np.asarray(sinusoid), temb=np.asarray(temb))
    temb0, ctx0 = temb[:1], ctx[:1]
    h = model.conv_in(x[:1, 0])
    first = model.down_blocks[0]
    h1 = first.resnets[0](h, temb0)
    ours["h_input1"] = nchw(h1 if first.attentions is None else first.attentions[0](h1, ctx0))
    for block in model.down_blocks:
        h, _ = block(h, temb0, ctx0, 1)
    ours["h_middle"] = nchw(model.mid_block(h, temb0, ctx0, 1))
    errors = {name: max_abs_error(value, io[name]) for name, value in ours.items()}
    bad = {name: (err, tolerance(io[name])) for name, err in errors.items() if err > tolerance(io[name])}
    assert not bad, f"{case.path}: over tolerance (error, tolerance): {bad}"
    return errors
