"""MagDiff (configs/magdiff.py): High-Fidelity Alignment starts as its base, the pyramid handles any aspect ratio,
Subject-Driven Alignment's subject image, the pipeline, and the trainer on moving_shapes' subject masks.

APA's parity with upstream is in tests/upstream_cases (magdiff_apa); the full-size model by shape here.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config, randomize_nnx
from vdjax.layers.primitives import InitKeys
from vdjax.models import subject as subject_lib
from vdjax.models.unet3d import UNet3D, abstract_unet

SPEC = "configs/magdiff.py:variant={}"


def _params(model) -> dict:
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _set(model, values: dict) -> None:
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path in values:
            var.set_value(jnp.asarray(values[path]))


@pytest.fixture(scope="module")
def models():
    """A random tiny MagDiff UNet (every parameter, the zero-initialised ones included) and its base: the same
    UNet without the subject input, holding the same weights (conv_in: the first 4 input channels)."""
    cfg = load_config(SPEC.format("tiny")).unet
    magdiff = UNet3D(cfg, rngs=InitKeys(0))
    randomize_nnx(magdiff, seed=1)
    base_cfg = cfg.copy_and_resolve_references()
    base_cfg.subject.channels = 0
    base = UNet3D(base_cfg, rngs=InitKeys(0))
    weights = _params(magdiff)
    weights[("conv_in", "kernel")] = weights[("conv_in", "kernel")][:, :, :cfg.in_channels]
    _set(base, weights)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 8, 12, 4)), jnp.float32)  # non-square latents
    context = jnp.asarray(rng.standard_normal((2, cfg.text_context_tokens + 4, cfg.cross_attention_dim)), jnp.float32)
    pyramid = tuple(jnp.asarray(rng.standard_normal((2, *size, 4)), jnp.float32)
                    for size in [(8, 12), (4, 6), (2, 3)])
    forward = nnx.jit(lambda m, x, c, s: m(x, jnp.array([10, 700]), c, fps=jnp.int32(8), subject=s))
    base_forward = nnx.jit(lambda m, x, c: m(x, jnp.array([10, 700]), c, fps=jnp.int32(8)))
    return cfg, magdiff, base, (x, context, pyramid), forward, base_forward


def test_zero_subject_channels_give_the_base_model(models):
    cfg, magdiff, base, (x, context, pyramid), forward, base_forward = models
    kernel = magdiff.conv_in.kernel.get_value()
    magdiff.conv_in.kernel.set_value(kernel.at[:, :, cfg.in_channels:].set(0))
    try:
        ours, want = forward(magdiff, x, context, pyramid), base_forward(base, x, context)
        err = float(jnp.max(jnp.abs(ours - want)))
        print(f"HFA with zero subject channels vs base: max abs error {err:.1e} (output std {float(want.std()):.2f})")
        assert err <= 1e-6
    finally:
        magdiff.conv_in.kernel.set_value(kernel)
    # With the subject channels random, the subject changes the output.
    moved = forward(magdiff, x, context, pyramid)
    assert float(jnp.max(jnp.abs(moved - want))) > 1e-2
    other = forward(magdiff, x, context, tuple(-z for z in pyramid))
    assert float(jnp.max(jnp.abs(moved - other))) > 1e-2


def test_a_fresh_model_starts_as_its_base():
    """As built (no randomising): conv_in's subject channels are zero and the fusion passes the finest level."""
    cfg = load_config(SPEC.format("tiny")).unet
    model = UNet3D(cfg, rngs=InitKeys(3))
    assert not np.asarray(model.conv_in.kernel.get_value()[:, :, cfg.in_channels:]).any()
    rng = np.random.default_rng(1)
    pyramid = [jnp.asarray(rng.standard_normal((1, *s, 4)), jnp.float32) for s in [(6, 10), (3, 5), (2, 3)]]
    np.testing.assert_allclose(model.subject_latent(pyramid), pyramid[0], atol=1e-6)


def test_pyramid_of_a_non_square_image():
    sizes = subject_lib.pyramid_sizes(320, 512, (1.0, 0.5, 0.25), 8)
    assert sizes == [(320, 512), (160, 256), (80, 128)]
    assert subject_lib.pyramid_sizes(40, 72, (1.0, 0.5, 0.25), 8) == [(40, 72), (16, 32), (8, 16)]
    cfg = load_config(SPEC.format("tiny"))
    from vdjax.models.vae import AutoencoderKL

    vae = AutoencoderKL(cfg.vae, rngs=InitKeys(0))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 24, 40, 3)), jnp.float32)
    latents = subject_lib.encode_pyramid(vae, images, (1.0, 0.5, 0.25), 0.18215)
    f = vae.downsampling_factor
    assert [z.shape for z in latents] == [(2, 24 // f, 40 // f, 4), (2, 12 // f, 20 // f, 4),
                                          (2, max(1, round(6 / f)), round(10 / f), 4)]
    model = UNet3D(cfg.unet, rngs=InitKeys(0))
    assert model.subject_latent(latents).shape == latents[0].shape


def test_single_scale_variant_and_bad_subject_inputs():
    single = load_config("configs/magdiff.py:variant=tiny,hfa=single").unet
    assert tuple(single.subject.scales) == (1.0,)
    model = UNet3D(single, rngs=InitKeys(0))
    assert model.subject_fusion is None
    x = jnp.zeros((1, 2, 4, 4, 4))
    context = jnp.zeros((1, single.text_context_tokens + 4, single.cross_attention_dim))
    with pytest.raises(ValueError, match="conditioned on a subject image"):
        model(x, jnp.array([1]), context, fps=8)
    with pytest.raises(ValueError, match="1 latent"):
        model(x, jnp.array([1]), context, fps=8, subject=(jnp.zeros((1, 4, 4, 4)),) * 2)
    with pytest.raises(ValueError, match="hfa="):
        load_config("configs/magdiff.py:variant=tiny,hfa=double")


def test_full_size_model_by_shape():
    """SD 2.1-base + LVDM temporal layers (VideoCrafter I2V 512's UNet) with APA and the 8-channel conv_in."""
    cfg = load_config(SPEC.format("sd21"))
    model = abstract_unet(cfg.unet)
    params = _params(model)
    assert params[("conv_in", "kernel")].shape == (3, 3, 8, 320)
    assert params[("subject_fusion", "conv", "kernel")].shape == (3, 3, 12, 4)
    scales = [p for p in params if p[-1] in ("text_cross_attention_scale", "image_cross_attention_scale")]
    assert len(scales) == 2 * 16  # APA at the 16 spatial transformers
    from vdjax.train.state import split_trainable

    _, trainable, frozen = split_trainable(model, cfg.train.trainable)
    count = lambda state: sum(math.prod(x.shape) for x in jax.tree.leaves(state))
    n_train, n_frozen = count(trainable), count(nnx.state(frozen, nnx.Param))
    print(f"MagDiff sd21 UNet: {n_train:,} trainable of {n_train + n_frozen:,}")
    trained = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert "conv_in.kernel" in trained and "subject_fusion.conv.kernel" in trained
    spatial = [p for p in trained if ".attentions." in p]  # spatial transformers: self-attention and APA only
    assert spatial and all(".attn1." in p or re.search(r"\.attn2\.(to_[kv]_ip|\w+_cross_attention_scale)", p)
                           for p in spatial)
