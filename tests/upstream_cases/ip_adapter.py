"""IP-Adapter (tencent-ailab/IP-Adapter): ImageProjModel and the IP-Adapter-Plus Resampler vs
vdjax.models.resampler. The attention processor case waits for the IP-Adapter attention (issue #9)."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import pytest

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from upstream_cases.videocrafter_resampler import check_resampler
from vdjax.convert.keymap import load_params
from vdjax.models.resampler import IP_ADAPTER_PREFIX, ImageProjModel, image_proj_config, image_proj_key
from vdjax.layers.primitives import InitKeys


def _image_proj_model(case: Case) -> dict[str, float]:
    io = case.io()
    model = ImageProjModel(image_proj_config(None, **case.meta["constructor_kwargs"]), rngs=InitKeys(0))
    prefix = case.meta.get("key_prefix", IP_ADAPTER_PREFIX)
    load_params(model, case.weights(), functools.partial(image_proj_key, prefix=prefix), source=str(case.path))
    error = max_abs_error(model(jnp.asarray(io["image_embeds"])), io["output"])
    assert error <= tolerance(io["output"]), error
    return {"output": error}


def run(case: Case) -> dict[str, float]:
    name = case.meta["case"]
    if name == "image_proj_model":
        return _image_proj_model(case)
    if name == "resampler":
        return check_resampler(case, "x", "output", IP_ADAPTER_PREFIX)
    if name == "ip_attn_processor":
        pytest.skip("ip_adapter/ip_attn_processor needs the IP-Adapter decoupled cross-attention in the UNet "
                    "(issue #9)")
    raise ValueError(f"ip_adapter: unknown case {name!r}")
