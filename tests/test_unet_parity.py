"""UNet3D vs diffusers (PyTorch), float32 on CPU, every parameter re-randomised.

- AnimateDiff: diffusers `UNetMotionModel`, v1-like (no mid-block motion module, 24 positions) and v2-like
  (mid-block module, 32 positions), several frame counts; vdjax with `norms=diffusers` (see the config).
- Image path: diffusers `UNet2DConditionModel`, SD 1.x-like (1x1-conv projections) and SD 2.x-like (linear
  projections, per-level head counts), vdjax with motion modules off and one frame.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import load_config, max_abs_error, randomize_torch
from vdjax.convert.diffusers import unet_ignored, unet_key
from vdjax.convert.keymap import load_params
from vdjax.models.unet3d import UNet3D
from vdjax.layers.primitives import InitKeys

TOL = 1e-4  # float32: max abs error on outputs of std ~1 (scaled by the output's std where larger)
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8)
MOTION = {"v1": dict(motion_max_seq_length=24, use_motion_mid_block=False),
          "v2": dict(motion_max_seq_length=32, use_motion_mid_block=True)}
FRAMES = {"v1": (3, 24), "v2": (5, 16)}


def _vdjax_from(torch_model, unet_cfg):
    state = randomize_torch(torch_model.eval())
    model = UNet3D(unet_cfg, rngs=InitKeys(0))
    load_params(model, state, unet_key, ignore=unet_ignored, source=type(torch_model).__name__)
    return model, nnx.jit(lambda m, x, t, c: m(x, t, c))


def _inputs(batch, frames, size=8, context_len=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, frames, size, size, 4)).astype(np.float32)
    t = np.array([981, 3, 500, 250][:batch])
    context = rng.standard_normal((batch, context_len, 32)).astype(np.float32)
    return x, t, context


def _check(name, ours, ref):
    err = max_abs_error(ours, ref)
    print(f"{name}: max abs error {err:.2e} (output std {np.std(ref):.3f})")
    assert err <= TOL * max(1.0, float(np.std(ref))), (name, err)


@pytest.fixture(scope="module", params=sorted(MOTION))
def motion_pair(request):
    from diffusers import UNetMotionModel

    torch.manual_seed(0)
    reference = UNetMotionModel(
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        num_attention_heads=2, motion_num_attention_heads=2, **TINY, **MOTION[request.param])
    cfg = load_config(f"configs/animatediff_sd15.py:variant=tiny_{request.param},norms=diffusers").unet
    return request.param, reference, *_vdjax_from(reference, cfg)


def test_motion_unet_matches_diffusers(motion_pair):
    variant, reference, model, forward = motion_pair
    for frames in FRAMES[variant]:
        x, t, context = _inputs(2, frames)
        with torch.no_grad():
            ref = reference(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)), torch.from_numpy(t),
                            torch.from_numpy(context).repeat_interleave(frames, 0)).sample.numpy()
        ours = np.asarray(forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)))
        _check(f"UNetMotionModel {variant} {frames} frames", ours.transpose(0, 4, 1, 2, 3), ref)


def test_original_norms_differ_from_diffusers(motion_pair):
    """The flag matters: AnimateDiff's own per-frame motion-module GroupNorm is not diffusers' per-clip one."""
    variant, _, model, forward = motion_pair
    cfg = load_config(f"configs/animatediff_sd15.py:variant=tiny_{variant}").unet
    original = UNet3D(cfg, rngs=InitKeys(0))
    nnx.update(original, nnx.state(model, nnx.Param))
    x, t, context = _inputs(1, 4)
    a = forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context))
    b = forward(original, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context))
    assert max_abs_error(a, b) > 1e-2


@pytest.mark.parametrize("linear", [False, True], ids=["sd1_conv_proj", "sd2_linear_proj"])
def test_image_unet_matches_diffusers(linear):
    from diffusers import UNet2DConditionModel

    heads = (2, 4)
    torch.manual_seed(0)
    reference = UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=heads, use_linear_projection=linear, **TINY)
    cfg = load_config("configs/animatediff_sd15.py:variant=tiny_sd15").unet
    cfg.num_attention_heads, cfg.use_linear_projection = heads, linear
    model, forward = _vdjax_from(reference, cfg)
    x, t, context = _inputs(3, 1, size=16)
    with torch.no_grad():
        ref = reference(torch.from_numpy(x[:, 0].transpose(0, 3, 1, 2)), torch.from_numpy(t),
                        torch.from_numpy(context)).sample.numpy()
    ours = np.asarray(forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)))
    _check(f"UNet2DConditionModel linear_proj={linear}", ours[:, 0].transpose(0, 3, 1, 2), ref)
