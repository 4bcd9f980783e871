"""Image projections (vdjax.models.resampler) at full size against released key manifests (no weights, no
compute), plus configuration and input errors. Numerical parity lives in the upstream fixture cases
(tests/upstream_cases/videocrafter_resampler.py, ip_adapter.py)."""
from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdjax.convert.keymap import KeyMapError, load_params, plan
from vdjax.convert.readers import LazyStateDict
from vdjax.layers.primitives import InitKeys
from vdjax.models.resampler import (IP_ADAPTER_PREFIX, VIDEOCRAFTER_PREFIX, ImageProjModel, Resampler,
                                    image_proj_config, image_proj_key, resampler_config)

MANIFESTS = pathlib.Path(__file__).parent / "fixtures" / "manifests"
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "upstream"

FULL_SIZE = {
    # preset: (module, config, manifest, key prefix, parameter count)
    "videocrafter_i2v": (Resampler, resampler_config("videocrafter_i2v"), "inference_i2v_512_v1.0",
                         VIDEOCRAFTER_PREFIX, 48_541_696),
    "ip_adapter_plus_sd15": (Resampler, resampler_config("ip_adapter_plus_sd15"), "ip_adapter_plus_sd15",
                             IP_ADAPTER_PREFIX, 29_918_208),
    "ip_adapter_sd15": (ImageProjModel, image_proj_config("ip_adapter_sd15"), "ip_adapter_sd15",
                        IP_ADAPTER_PREFIX, 3_150_336),
}


@functools.lru_cache(None)
def _released(manifest: str, prefix: str) -> dict[str, tuple]:
    keys = json.loads((MANIFESTS / f"{manifest}.json").read_text())["keys"]
    return {k: tuple(v) for k, v in keys.items() if k.startswith(prefix)}


def _abstract(module, config):
    return nnx.eval_shape(lambda: module(config, rngs=InitKeys(0)))


@pytest.mark.parametrize("preset", sorted(FULL_SIZE))
def test_full_size_matches_released_keys(preset):
    module, config, manifest, prefix, count = FULL_SIZE[preset]
    model, released = _abstract(module, config), _released(manifest, prefix)
    ours = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(var.shape)
        ours[image_proj_key(path, prefix)] = shape[::-1] if path[-1] == "kernel" else shape  # torch layout
    assert sorted(set(released) - set(ours)) == [], "released keys vdjax does not build"
    assert sorted(set(ours) - set(released)) == [], "vdjax parameters the released file does not have"
    assert {k: v for k, v in ours.items() if released[k] != v} == {}
    assert sum(math.prod(s) for s in ours.values()) == sum(math.prod(s) for s in released.values()) == count

    # The loader's own strict, shape-only plan over the whole file: every other key is someone else's.
    def load(key):
        raise AssertionError(f"shape-only check read {key}")
    all_keys = json.loads((MANIFESTS / f"{manifest}.json").read_text())["keys"]
    state = LazyStateDict(manifest, {k: tuple(v) for k, v in all_keys.items()}, load)
    mapping = plan(model, state, functools.partial(image_proj_key, prefix=prefix),
                   ignore=lambda key: not key.startswith(prefix), source=manifest)
    assert sorted(mapping.values()) == sorted(released)


def test_every_parameter_has_logical_axes():
    model = _abstract(Resampler, resampler_config("videocrafter_i2v"))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.ndim, (path, names)


def test_key_fn():
    assert image_proj_key(("layers", 3, "attn", "to_kv", "kernel")) == "image_proj_model.layers.3.0.to_kv.weight"
    assert image_proj_key(("layers", 0, "ff", "norm", "scale"), IP_ADAPTER_PREFIX) == "image_proj.layers.0.1.0.weight"
    assert image_proj_key(("layers", 1, "ff", "fc2", "kernel"), "") == "layers.1.1.3.weight"
    assert image_proj_key(("latents",)) == "image_proj_model.latents"
    assert image_proj_key(("norm_out", "bias")) == "image_proj_model.norm_out.bias"


def test_bad_input_shapes_say_what_is_expected():
    resampler = Resampler(resampler_config("tiny"), rngs=InitKeys(0))
    with pytest.raises(ValueError, match=r"Resampler input must be \(batch, tokens, 40\); got shape \(2, 17, 41\)"):
        resampler(jnp.zeros((2, 17, 41)))
    with pytest.raises(ValueError, match=r"got shape \(17, 40\)"):
        resampler(jnp.zeros((17, 40)))
    proj = ImageProjModel(image_proj_config("tiny"), rngs=InitKeys(0))
    with pytest.raises(ValueError, match=r"ImageProjModel input must be \(batch, 48\).*got shape \(2, 1, 48\)"):
        proj(jnp.zeros((2, 1, 48)))


def test_config_errors():
    with pytest.raises(ValueError, match="unknown Resampler preset 'nope'.*ip_adapter_plus_sd15"):
        resampler_config("nope")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['n_heads'\]"):
        resampler_config("tiny", n_heads=2)
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        resampler_config("tiny", dtype="fp8")
    with pytest.raises(NotImplementedError, match="apply_pos_emb=True"):
        Resampler(resampler_config("tiny", apply_pos_emb=True), rngs=InitKeys(0))
    with pytest.raises(NotImplementedError, match="num_latents_mean_pooled=2"):
        Resampler(resampler_config("tiny", num_latents_mean_pooled=2), rngs=InitKeys(0))
    with pytest.raises(ValueError, match="heads must be a positive integer"):
        Resampler(resampler_config("tiny", heads=0), rngs=InitKeys(0))
    # Upstream class defaults when no preset is named.
    assert resampler_config(None).depth == 8 and image_proj_config(None).cross_attention_dim == 1024


def test_wrong_prefix_is_a_key_map_error():
    from safetensors.numpy import load_file
    state = load_file(str(FIXTURES / "videocrafter_resampler/resampler/weights.safetensors"))
    model = Resampler(resampler_config("tiny"), rngs=InitKeys(0))
    with pytest.raises(KeyMapError, match=r"(?s)29 missing key.*image_proj\.latents"):
        load_params(model, state, functools.partial(image_proj_key, prefix=IP_ADAPTER_PREFIX), source="fixture")


def test_bfloat16_compute_tracks_float32():
    x = jax.random.normal(jax.random.key(1), (2, 17, 40))
    f32 = Resampler(resampler_config("tiny"), rngs=InitKeys(0))
    bf16 = Resampler(resampler_config("tiny", dtype="bfloat16"), rngs=InitKeys(0))
    y32, y16 = nnx.jit(lambda m, x: m(x))(f32, x), nnx.jit(lambda m, x: m(x))(bf16, x)
    assert y16.dtype == jnp.float32 and y16.shape == (2, 4, 24)
    assert all(v.dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param)))
    np.testing.assert_allclose(np.asarray(y16), np.asarray(y32), atol=0.1)
