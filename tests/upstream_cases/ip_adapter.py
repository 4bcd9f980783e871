"""IP-Adapter (tencent-ailab/IP-Adapter): ImageProjModel and the IP-Adapter-Plus Resampler vs
vdjax.models.resampler; its attention processor vs vdjax's DecoupledCrossAttention (released `ip_adapter.N.` keys)."""
from __future__ import annotations

import functools

import jax.numpy as jnp

from conftest import max_abs_error
from upstream_cases.case import Case, tolerance
from upstream_cases.videocrafter_resampler import check_resampler
from vdjax.convert.keymap import load_params, path_to_key, rename, torch_leaf
from vdjax.layers.attention import DecoupledCrossAttention
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


def _ip_attention(case: Case) -> dict[str, float]:
    io, kw = case.io(), case.meta["constructor_kwargs"]
    host, processor = kw["attention (diffusers.models.attention_processor.Attention)"], kw["processor (IPAttnProcessor)"]
    model = DecoupledCrossAttention(host["query_dim"], host["heads"], host["dim_head"],
                                    context_dim=host["cross_attention_dim"], image_tokens=processor["num_tokens"],
                                    image_scale=processor["scale"], rngs=InitKeys(0))
    # The processor's weights in the released file's form (`ip_adapter.1.` = this site), the host's unprefixed.
    key = lambda path: torch_leaf(rename(path_to_key(path), ((r"^to_out\.", "to_out.0."),
                                                             (r"^(to_[kv]_ip)\.", r"ip_adapter.1.\1."))))
    load_params(model, case.weights(), key, source=str(case.path))
    out = model(jnp.asarray(io["hidden_states"]), jnp.asarray(io["encoder_hidden_states"]))
    error = max_abs_error(out, io["output"])
    assert error <= tolerance(io["output"]), error
    return {"output": error}


def run(case: Case) -> dict[str, float]:
    name = case.meta["case"]
    if name == "image_proj_model":
        return _image_proj_model(case)
    if name == "resampler":
        return check_resampler(case, "x", "output", IP_ADAPTER_PREFIX)
    if name == "ip_attn_processor":
        return _ip_attention(case)
    raise ValueError(f"ip_adapter: unknown case {name!r}")
