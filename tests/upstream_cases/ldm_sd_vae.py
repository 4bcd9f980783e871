"""Stable Diffusion's original ldm `AutoencoderKL` (Stability-AI/stablediffusion) vs vdjax's AutoencoderKL, weights in
the LDM single-file layout (`first_stage_model.*`, mid attention as 1x1 convs)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from vdjax.convert.ldm import load_vae, vae_config
from vdjax.layers.primitives import InitKeys
from vdjax.models.vae import AutoencoderKL, Posterior


def run(case: Case) -> dict[str, float]:
    io = case.io()
    cfg = vae_config(case.meta["constructor_kwargs"])
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=InitKeys(0)))  # every parameter comes from the file
    load_vae(model, case.weights(), source=str(case.path))
    nhwc = lambda a: jnp.asarray(np.moveaxis(a, 1, -1))
    nchw = lambda a: np.moveaxis(np.asarray(a), -1, 1)
    x = nhwc(io["x"])
    moments = model.quant_conv(model.encoder(x))  # what `encode` wraps in a Posterior
    posterior = model.encode(x)
    ours = {"moments": moments, "mean": posterior.mean, "logvar": posterior.logvar, "std": posterior.std,
            "image": model.decode(nhwc(io["z"])), "recon": model.decode(posterior.mode())}
    assert np.array_equal(np.asarray(Posterior(moments).mean), np.asarray(posterior.mean))
    errors = {name: max_abs_error(nchw(value), io[name]) for name, value in ours.items()}
    bad = {name: (err, tolerance(io[name])) for name, err in errors.items() if err > tolerance(io[name])}
    assert not bad, f"{case.path}: over tolerance (error, tolerance): {bad}"
    return errors
