"""VideoCrafter's perceiver Resampler (lvdm/modules/encoders/ip_resampler.py) vs vdjax.models.resampler."""
from __future__ import annotations

import functools

import jax.numpy as jnp

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from vdjax.convert.keymap import load_params
from vdjax.models.resampler import VIDEOCRAFTER_PREFIX, Resampler, image_proj_key, resampler_config
from vdjax.layers.primitives import InitKeys


def check_resampler(case: Case, x_name: str, y_name: str, default_prefix: str) -> dict[str, float]:
    """Build the Resampler from the upstream constructor kwargs, load the case weights strictly, compare."""
    io = case.io()
    model = Resampler(resampler_config(None, **case.meta["constructor_kwargs"]), rngs=InitKeys(0))
    prefix = case.meta.get("key_prefix", default_prefix)
    load_params(model, case.weights(), functools.partial(image_proj_key, prefix=prefix), source=str(case.path))
    error = max_abs_error(model(jnp.asarray(io[x_name])), io[y_name])
    assert error <= tolerance(io[y_name]), error
    return {y_name: error}


def run(case: Case) -> dict[str, float]:
    return check_resampler(case, "x", "y", VIDEOCRAFTER_PREFIX)
