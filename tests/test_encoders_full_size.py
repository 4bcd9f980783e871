"""Full-size VAE and OpenCLIP towers against a released VideoCrafter checkpoint's key list, without compute."""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from vdjax.convert.openclip import TEXT_UNUSED, VISION_UNUSED, text_key, vision_key
from vdjax.layers.primitives import InitKeys
from vdjax.models.openclip import TextTower, VisionTower, text_config, vision_config
from vdjax.models.vae import AutoencoderKL, base_config

MANIFEST = json.loads((pathlib.Path(__file__).parent / "fixtures/manifests/inference_i2v_512_v1.0.json").read_text())


def _released(prefix: str, unused) -> dict[str, tuple]:
    """The manifest's keys under `prefix`, packed attention projections split as vdjax loads them."""
    out = {}
    for key, shape in MANIFEST["keys"].items():
        if not key.startswith(prefix) or unused.search(key):
            continue
        if key.endswith((".in_proj_weight", ".in_proj_bias")):
            base, kind = key.rsplit(".in_proj_", 1)
            for name in "qkv":
                out[f"{base}.in_proj_{name}.{kind}"] = (shape[0] // 3, *shape[1:])
        else:
            out[key] = tuple(shape)
    return out


def _ours(model, key_fn) -> dict[str, tuple]:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(var.shape)
        if path[-1] == "kernel":  # back to torch's layout: Linear (out, in), Conv (O, I, kh, kw)
            shape = shape[::-1] if len(shape) == 2 else (shape[-1], shape[-2], *shape[:-2])
        out[key_fn(path)] = shape
    return out


@pytest.mark.parametrize("tower,config,key_fn,prefix,unused", [
    (TextTower, text_config, text_key(), "cond_stage_model.model.", TEXT_UNUSED),
    (VisionTower, vision_config, vision_key(), "embedder.model.", VISION_UNUSED),
], ids=["text", "vision"])
def test_openclip_vit_h14_towers_match_the_released_keys(tower, config, key_fn, prefix, unused):
    model = nnx.eval_shape(lambda: tower(config("vit_h14"), rngs=InitKeys(0)))
    ours, released = _ours(model, key_fn), _released(prefix, unused)
    assert sorted(set(released) ^ set(ours)) == []
    assert {k: (v, released[k]) for k, v in ours.items() if released[k] != v} == {}


def test_vae_parameter_count_matches_the_released_first_stage_model():
    model = nnx.eval_shape(lambda: AutoencoderKL(base_config(), rngs=InitKeys(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    released = sum(int(np.prod(s)) for k, s in MANIFEST["keys"].items() if k.startswith("first_stage_model."))
    assert ours == released
