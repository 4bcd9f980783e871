"""UNet3D without a reference run: full-size shapes, released key sets, bfloat16, compilation, bad input."""
from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import load_config, max_abs_error, randomize_nnx
from vdjax.convert.animatediff import is_motion_param, motion_key
from vdjax.models.unet3d import UNet3D, abstract_unet
from vdjax.layers.primitives import InitKeys
from vdjax.train.step import REMAT

MANIFESTS = pathlib.Path(__file__).parent / "fixtures" / "manifests"


@functools.lru_cache(maxsize=None)
def _abstract(spec):
    return abstract_unet(load_config(spec).unet)


def _param_count(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("variant", ["v1", "v2", "v3", "sd15"])
def test_full_size_parameter_count_matches_diffusers(variant):
    from diffusers import UNet2DConditionModel, UNetMotionModel

    sd15 = dict(cross_attention_dim=768)
    with torch.device("meta"):
        if variant == "sd15":
            reference = UNet2DConditionModel(attention_head_dim=8, **sd15)
        else:
            reference = UNetMotionModel(num_attention_heads=8, motion_num_attention_heads=8,
                                        motion_max_seq_length=24 if variant == "v1" else 32,
                                        use_motion_mid_block=variant == "v2", **sd15)
    expected = sum(p.numel() for p in reference.parameters())
    assert _param_count(_abstract(f"configs/animatediff_sd15.py:variant={variant}")) == expected


@pytest.mark.parametrize("variant,manifest", [("v1", "mm_sd_v15"), ("v2", "mm_sd_v15_v2"), ("v3", "v3_sd15_mm")])
def test_motion_modules_cover_released_checkpoint_keys(variant, manifest):
    """Every key and shape of the released motion-module file maps onto the full-size model, nothing left over."""
    data = json.loads((MANIFESTS / f"animatediff_{manifest}.json").read_text())
    released = {k: tuple(v) for k, v in data["keys"].items() if k not in set(data["buffers"])}
    ours = {}
    for path, var in nnx.to_flat_state(nnx.state(_abstract(f"configs/animatediff_sd15.py:variant={variant}"),
                                                 nnx.Param)):
        if is_motion_param(path):
            shape = tuple(var.shape)
            ours[motion_key(path)] = shape[::-1] if len(shape) == 2 else shape  # torch Linear is (out, in)
    assert sorted(set(released) - set(ours)) == [] and sorted(set(ours) - set(released)) == []
    assert {k: v for k, v in ours.items() if released[k] != v} == {}
    positions = {v[1] for k, v in data["keys"].items() if k in data["buffers"]}
    assert positions == {load_config(f"configs/animatediff_sd15.py:variant={variant}").unet.motion.max_positions}


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("configs/animatediff_sd15.py:variant=tiny_v2").unet
    model = UNet3D(cfg, rngs=InitKeys(0))
    randomize_nnx(model, seed=1)
    return cfg, model


def _inputs(frames=4, size=8, batch=2):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((batch, frames, size, size, 4)), jnp.float32), jnp.array([10, 900][:batch]),
            jnp.asarray(rng.standard_normal((batch, 7, 32)), jnp.float32))


def test_bfloat16_compute_stays_close_to_float32(tiny):
    """bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.4%); through the ~30 layers of the tiny UNet,
    rounding of that size in every matmul/conv adds up like a random walk. We require the bfloat16 output to stay
    within 10% of the float32 output's std (max abs) and 3% (RMS); measured 6.8% and 1.8%."""
    cfg, model = tiny
    low_cfg = cfg.copy_and_resolve_references()
    low_cfg.dtype = "bfloat16"
    low = UNet3D(low_cfg, rngs=InitKeys(0))
    nnx.update(low, nnx.state(model, nnx.Param))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(low, nnx.Param)))  # params stay float32
    x, t, c = _inputs()
    ref = np.asarray(nnx.jit(lambda m: m(x, t, c))(model))
    out = np.asarray(nnx.jit(lambda m: m(x, t, c))(low))
    scale = float(np.std(ref))
    rms = float(np.sqrt(np.mean((out - ref) ** 2)))
    print(f"bfloat16 vs float32: max abs {max_abs_error(out, ref):.3e}, rms {rms:.3e}, output std {scale:.3f}")
    assert max_abs_error(out, ref) <= 0.1 * scale and rms <= 0.03 * scale


def test_jitted_forward_compiles_once_per_shape(tiny):
    _, model = tiny
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def forward(state, x, t, c):
        traces.append(x.shape)
        return nnx.merge(graphdef, state)(x, t, c)

    x, t, c = _inputs()
    first = forward(state, x, t, c)
    forward(state, x + 1.0, t + 5, c * 2.0)
    assert len(traces) == 1
    forward(state, *_inputs(frames=6))
    assert len(traces) == 2
    np.testing.assert_array_equal(np.asarray(first), np.asarray(forward(state, x, t, c)))  # deterministic
    assert len(traces) == 2


def test_rematerialisation_keeps_the_gradients_and_saves_less(tiny):
    """`remat` recomputes each layer in the backward pass: the gradients are unchanged, and what the forward pass keeps
    for the backward pass (the residuals jax.vjp holds) shrinks to the layers' inputs. (A checkpoint around the whole
    loss, as the Trainer once had, keeps only the inputs too, but its backward pass then recomputes the whole forward
    pass and holds all of it.) XLA's CPU backend does not show the saving in its temporaries (the same with and
    without); `python bench/train_step.py` on a GPU is to measure it."""
    _, model = tiny
    graphdef, params = nnx.split(model)
    x, t, c = _inputs()
    kept, grads = {}, {}
    nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
    for name, policy in REMAT.items():  # config.train.remat's policies
        loss = lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p)(x, t, c, remat=policy)))
        backward = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)  # the residuals' shapes: a pytree
        kept[name] = nbytes(backward) - nbytes(params)
        grads[name] = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
    print(f"residuals kept for the backward pass (bytes): {kept}")
    for name in ("full", "dots"):
        assert max(max_abs_error(a, b) for a, b in zip(grads[name], grads["none"])) <= 1e-6, name
    assert kept["full"] < 0.1 * kept["none"] and kept["dots"] < 0.5 * kept["none"], kept


def test_zero_initialised_motion_modules_leave_the_image_unet_unchanged():
    """A fresh motion module's proj_out is zero, so it starts as the identity (AnimateDiff's zero_initialize)."""
    video = UNet3D(load_config("configs/animatediff_sd15.py:variant=tiny_v2").unet, rngs=InitKeys(0))
    image = UNet3D(load_config("configs/animatediff_sd15.py:variant=tiny_sd15").unet, rngs=InitKeys(0))
    randomize_nnx(image, seed=2)
    shared = {p: v for p, v in nnx.to_flat_state(nnx.state(image, nnx.Param))}
    nnx.update(video, nnx.from_flat_state(shared))
    x, t, c = _inputs(frames=3)
    forward = nnx.jit(lambda m: m(x, t, c))
    assert max_abs_error(forward(video), forward(image)) < 1e-5


@pytest.mark.parametrize("shape,context,message", [
    ((2, 4, 9, 8, 4), (2, 7, 32), "not divisible by the UNet's downsampling factor 2"),
    ((2, 33, 8, 8, 4), (2, 7, 32), "this model takes 1 to 32 frames"),
    ((2, 4, 8, 8, 4), (2, 7, 48), r"context must be \(batch=2, tokens, 32\)"),
    ((2, 4, 8, 8, 3), (2, 7, 32), "this UNet takes 4"),
    ((2, 8, 8, 4), (2, 7, 32), r"\(batch, frames, height, width, channels\)"),
])
def test_bad_input_names_what_the_unet_takes(tiny, shape, context, message):
    _, model = tiny
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model, jax.ShapeDtypeStruct(shape, jnp.float32), jnp.zeros((shape[0],)),
                       jax.ShapeDtypeStruct(context, jnp.float32))


@pytest.mark.parametrize("key,value,new_param", [
    ("motion.kind", "lvdm", "relative_position"), ("image_cross_attention", "ip_adapter", "to_k_ip"),
    ("image_cross_attention", "lvdm_dual", "to_k_ip"), ("image_cross_attention", "magdiff_apa",
                                                         "image_cross_attention_scale"),
    ("first_frame_attention", True, "to_q_ff"), ("fps_conditioning", True, "fps_embedding"),
    ("init_attention", True, "init_attention"), ("temporal_conv", True, "temporal_convs"),
])
def test_every_declared_option_builds(key, value, new_param):
    """Each family option adds its parameters (shapes only; behaviour is checked against the upstream fixtures)."""
    cfg = load_config("configs/animatediff_sd15.py:variant=tiny_v2").unet
    target, _, leaf = key.rpartition(".")
    (cfg[target] if target else cfg)[leaf] = value
    if key == "motion.kind":
        cfg.motion.relative_position = True
    model = nnx.eval_shape(lambda: UNet3D(cfg, rngs=InitKeys(0)))
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert any(new_param in p for p in paths), new_param


def test_unknown_option_values_are_refused():
    cfg = load_config("configs/animatediff_sd15.py:variant=tiny_v2").unet
    cfg.motion.norm_scope = "batch"
    with pytest.raises(ValueError, match="motion.norm_scope"):
        UNet3D(cfg, rngs=InitKeys(0))
    with pytest.raises(ValueError, match="unknown variant"):
        load_config("configs/animatediff_sd15.py:variant=v4")


def test_upsample_conv_equals_torch_nearest_upsample_then_conv():
    """Upsample computes conv3x3(nearest 2x(x)) on the low-resolution grid, one 2x2 convolution per output phase:
    values and gradients (input, kernel, bias) equal torch's F.interpolate + F.conv2d on odd, non-square frames."""
    import torch.nn.functional as F

    from vdjax.layers.resnet import upsample_conv

    rng = np.random.default_rng(0)
    x, kernel, bias = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, 7, 6), (3, 3, 6, 4), (4,)))
    weights = rng.standard_normal((2, 10, 14, 4)).astype(np.float32)  # a loss that weighs every output differently

    def loss(x, kernel, bias):
        return jnp.sum(upsample_conv(x, kernel, bias) * weights)

    out = upsample_conv(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias))
    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias))
    tx, tk, tb = (torch.tensor(a, requires_grad=True) for a in (x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1),
                                                                bias))
    ref = F.conv2d(F.interpolate(tx, scale_factor=2.0, mode="nearest"), tk, tb, padding=1)
    (ref * torch.from_numpy(weights.transpose(0, 3, 1, 2))).sum().backward()
    assert out.shape == (2, 10, 14, 4)
    assert max_abs_error(out, ref.detach().numpy().transpose(0, 2, 3, 1)) < 1e-5
    for ours, theirs in zip(grads, (tx.grad.numpy().transpose(0, 2, 3, 1), tk.grad.numpy().transpose(2, 3, 1, 0),
                                    tb.grad.numpy())):
        assert max_abs_error(ours, theirs) < 1e-4 * max(1.0, float(np.abs(theirs).max()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_bias_inside_the_product_is_the_linear_layer(dtype):
    """primitives.biased_dot (the GEGLU's proj_in on a CPU): the layer's output, bias included, in its dtype."""
    from vdjax.layers.primitives import biased_dot, dense

    layer = dense(24, 40, dtype=dtype, rngs=InitKeys(0))
    randomize_nnx(layer, seed=2)  # a bias of std 0.2
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 24)), jnp.float32)
    got, want = biased_dot(layer, x), layer(x)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - (x.astype(dtype) @ layer.kernel[...].astype(dtype))))) > 0.1
