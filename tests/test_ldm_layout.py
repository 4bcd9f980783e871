"""The LDM single-file layout at full size, by key and shape only (no weights, no compute): the SD 1.5 / 2.1-v /
2.1-base key manifests (tests/fixtures/manifests/*_ldm.json, upstream LatentDiffusion.state_dict()) against
abstract vdjax models."""
from __future__ import annotations

import functools
import pathlib
import re
import types

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import manifest, shapes_only
from vdjax.convert import ldm
from vdjax.convert.keymap import KeyMapError, plan, to_flax_layout
from vdjax.layers.primitives import InitKeys
from vdjax.models import clip, openclip, unet3d, vae

MANIFESTS = pathlib.Path(__file__).parent / "fixtures/manifests"
FORMAT = {"sd15_ldm": "ldm_sd1", "sd21v_ldm": "ldm_sd2", "sd21base_ldm": "ldm_sd2"}




def sd21_unet_config():
    cfg = unet3d.base_config()
    cfg.update(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
    return cfg


@functools.lru_cache(None)
def abstract(part: str, fmt: str):
    """Abstract models, built once: eval_shape with InitKeys (no memory, no compute)."""
    sd2 = fmt == "ldm_sd2"
    build = {
        "unet": lambda: unet3d.UNet3D(sd21_unet_config() if sd2 else unet3d.base_config(), rngs=InitKeys(0)),
        "vae": lambda: vae.AutoencoderKL(vae.base_config(), rngs=InitKeys(0)),
        "text_encoder": lambda: (openclip.TextTower(openclip.text_config("vit_h14"), rngs=InitKeys(0)) if sd2 else
                                 clip.CLIPTextModel(clip.text_config("vit_l14"), rngs=InitKeys(0))),
    }[part]
    return nnx.eval_shape(build)


def config_for(model_config, part):
    return types.SimpleNamespace(**{part: model_config})


@pytest.mark.parametrize("name", sorted(FORMAT))
def test_manifest_maps_completely(name):
    fmt, m = FORMAT[name], manifest(name)
    keys = {**m["keys"], **m["optional_keys"]}  # EMA scalars and CLIP position_ids ride along in released files
    keys["model_ema.diffusion_modelinput_blocks00weight"] = m["keys"]["model.diffusion_model.input_blocks.0.0.weight"]
    state = shapes_only(keys, name)
    used = set()
    for part in ("unet", "vae", "text_encoder"):
        model = abstract(part, fmt)
        pm = ldm.part_map(part, fmt, config_for(getattr(model, "config", None), part))
        # plan: every parameter has its key with the right shape, every other key of the file is ignored.
        mapping = plan(model, pm.prepare(state), pm.key_fn, ignore=pm.ignore, source=f"{name} {part}")
        used |= {re.sub(r"\.in_proj_[qkv]\.", ".in_proj_", k) for k in mapping.values()}  # packed in the file
    rest = set(keys) - used
    # Everything left is on the named ignore list, and that list takes no real weight.
    assert sorted(k for k in rest if not ldm.ignored(k)) == []
    expected = set(m["buffers"]) | set(m["optional_keys"]) | {"model_ema.diffusion_modelinput_blocks00weight"}
    if fmt == "ldm_sd2":
        expected |= {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
    assert rest == expected


@pytest.mark.parametrize("name,base", [("sd15_ldm", unet3d.base_config), ("sd21v_ldm", sd21_unet_config),
                                       ("sd21base_ldm", sd21_unet_config)])
def test_unet_config_from_the_yaml(name, base):
    params = manifest(name)["config"]["params"]
    assert ldm.unet_config(params["unet_config"]["params"]).to_dict() == base().to_dict()
    assert ldm.vae_config(params["first_stage_config"]["params"]).to_dict() == vae.base_config().to_dict()


def test_sd2_file_into_the_sd15_unet_lists_misshaped_keys():
    pm = ldm.part_map("unet", "ldm_sd2", config_for(unet3d.base_config(), "unet"))
    with pytest.raises(KeyMapError) as err:
        plan(abstract("unet", "ldm_sd1"), shapes_only(manifest("sd21base_ldm")["keys"], "sd21"), pm.key_fn,
             ignore=pm.ignore, source="sd21")
    message = str(err.value)
    assert "mis-shaped" in message and "input_blocks.1.1.proj_in.weight: file (320, 320)" in message
    assert any("attn2.to_k.weight: file (320, 1024)" in k for k in err.value.misshaped)
    assert not err.value.missing and not err.value.unexpected


def test_missing_and_unexpected_keys_are_listed():
    keys = dict(manifest("sd15_ldm")["keys"])
    gone = "model.diffusion_model.output_blocks.2.1.conv.weight"  # the upsampler of the deepest level
    del keys[gone]
    keys["model.diffusion_model.output_blocks.2.2.conv.weight"] = [1280, 1280, 3, 3]
    pm = ldm.part_map("unet", "ldm_sd1", config_for(unet3d.base_config(), "unet"))
    with pytest.raises(KeyMapError) as err:
        plan(abstract("unet", "ldm_sd1"), shapes_only(keys, "sd15"), pm.key_fn, ignore=pm.ignore, source="sd15")
    assert err.value.missing == [gone]
    assert err.value.unexpected == ["model.diffusion_model.output_blocks.2.2.conv.weight"]
    assert "1 missing key(s)" in str(err.value) and "1 unexpected key(s)" in str(err.value)



def _torch_shape(path, shape):
    if path[-1] != "kernel" or len(shape) < 2:
        return shape
    return shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])  # Linear / Conv2d


def _file_of(model, key_fn, skip=lambda p: False, **extra):
    """Random weights in the LDM layout for an abstract model's parameters, plus other parts' keys."""
    rng = np.random.default_rng(0)
    state = {key_fn(p): rng.standard_normal(_torch_shape(p, v.shape)).astype(np.float32)
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if not skip(p)}
    return {**state, "betas": np.zeros(1000), "model.diffusion_model.out.2.bias": np.zeros(4),
            "first_stage_model.quant_conv.bias": np.zeros(8), **extra}


def _filled_from(model, state, key_fn):
    """{path: filled?} after loading: every filled parameter holds its file tensor in flax layout."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_raw_value()
        out[path] = not isinstance(value, jax.ShapeDtypeStruct)
        if out[path]:
            np.testing.assert_array_equal(value, to_flax_layout(state[key_fn(path)], value.ndim)
                                          if path[-1] == "kernel" else state[key_fn(path)])
    return out


def test_text_encoders_load_from_a_whole_file():
    sd1 = nnx.eval_shape(lambda: clip.CLIPTextModel(clip.text_config("tiny"), rngs=InitKeys(0)))
    state = _file_of(sd1, ldm.clip_text_key,
                     **{"cond_stage_model.transformer.text_model.embeddings.position_ids": np.zeros((1, 16))})
    ldm.load_text_encoder(sd1, state)
    assert all(_filled_from(sd1, state, ldm.clip_text_key).values())

    sd2 = nnx.eval_shape(lambda: openclip.TextTower(openclip.text_config("tiny"), rngs=InitKeys(0)))
    key_fn = ldm.part_map("text_encoder", "ldm_sd2", None).key_fn
    split = _file_of(sd2, key_fn, **{"cond_stage_model.model.logit_scale": np.zeros(())})
    state = dict(split)
    for key in [k for k in state if ".attn.in_proj_q." in k]:  # packed q, k, v as nn.MultiheadAttention has them
        parts = [state.pop(key.replace("in_proj_q", f"in_proj_{q}")) for q in "qkv"]
        state[key.replace("in_proj_q.", "in_proj_")] = np.concatenate(parts, axis=0)
    ldm.load_text_encoder(sd2, state)
    assert all(_filled_from(sd2, split, key_fn).values())


def test_unet_from_ema_copies_leaves_motion_modules_alone():
    cfg = unet3d.base_config()
    cfg.update(block_out_channels=(32, 64), attention_levels=(False, True), num_attention_heads=(2, 2),
               layers_per_block=1, cross_attention_dim=32, norm_num_groups=8)
    cfg.motion.update(kind="animatediff", num_attention_heads=2)
    model = nnx.eval_shape(lambda: unet3d.UNet3D(cfg, rngs=InitKeys(0)))
    key_fn = ldm.unet_key(cfg, ema=True)
    is_motion = lambda p: "motion_modules" in p  # SD files carry no motion modules
    state = _file_of(model, key_fn, skip=is_motion, **{"model_ema.decay": np.float32(0.9999)})
    ldm.load_unet(model, state, ema=True)
    assert {p: filled for p, filled in _filled_from(model, state, key_fn).items() if filled == is_motion(p)} == {}
    assert ldm.unet_key(cfg)(("up_blocks", 0, "upsampler", "conv", "kernel")) == \
        "model.diffusion_model.output_blocks.1.2.conv.weight"  # after the transformer of an attention level
