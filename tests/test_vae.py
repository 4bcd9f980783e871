"""AutoencoderKL vs diffusers (PyTorch), float32 on CPU, every parameter re-randomised; chunked video = whole."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import max_abs_error, randomize_torch
from vdjax.convert.diffusers import vae_key
from vdjax.convert.keymap import load_params
from vdjax.layers.primitives import InitKeys
from vdjax.models.vae import AutoencoderKL, Posterior, base_config, tiny_config

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    from diffusers import AutoencoderKL as Reference

    torch.manual_seed(0)
    reference = Reference(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8).eval()
    state = randomize_torch(reference, seed=3)
    model = AutoencoderKL(tiny_config(), rngs=InitKeys(0))
    load_params(model, state, vae_key, source="diffusers AutoencoderKL")
    return reference, model


def _check(name, ours, ref):
    err = max_abs_error(ours, ref)
    print(f"VAE {name}: max abs error {err:.2e} (reference std {np.std(ref):.3f})")
    assert err <= TOL * max(1.0, float(np.std(ref))), (name, err)


def test_encode_and_decode_match_diffusers(pair):
    reference, model = pair
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
    with torch.no_grad():
        dist = reference.encode(torch.from_numpy(images)).latent_dist
        decoded = reference.decode(torch.from_numpy(latents)).sample.numpy()
    posterior = nnx.jit(lambda m, x: m.encode(x).mean)(model, jnp.asarray(images.transpose(0, 2, 3, 1)))
    std = nnx.jit(lambda m, x: m.encode(x).std)(model, jnp.asarray(images.transpose(0, 2, 3, 1)))
    _check("posterior mean", np.asarray(posterior).transpose(0, 3, 1, 2), dist.mean.numpy())
    _check("posterior std", np.asarray(std).transpose(0, 3, 1, 2), dist.std.numpy())
    ours = nnx.jit(lambda m, z: m.decode(z))(model, jnp.asarray(latents.transpose(0, 2, 3, 1)))
    _check("decode", np.asarray(ours).transpose(0, 3, 1, 2), decoded)


def test_chunked_video_equals_whole_clip(pair):
    _, model = pair
    rng = np.random.default_rng(1)
    video = jnp.asarray(rng.uniform(-1, 1, (2, 5, 8, 8, 3)), jnp.float32)
    moments = nnx.jit(lambda m, v: m.encode_video(v, chunk_size=3))(model, video)
    whole = nnx.jit(lambda m, v: m.quant_conv(m.encoder(v.reshape(10, 8, 8, 3))))(model, video)
    assert max_abs_error(moments.reshape(whole.shape), whole) <= 1e-5
    z = Posterior(moments).mode()
    chunked = nnx.jit(lambda m, z: m.decode_video(z, chunk_size=3))(model, z)
    full = nnx.jit(lambda m, z: m.decode(z.reshape(10, 4, 4, 4)))(model, z)
    assert chunked.shape == (2, 5, 8, 8, 3)
    assert max_abs_error(chunked.reshape(full.shape), full) <= 1e-5


def test_full_size_parameter_count_matches_diffusers():
    from diffusers import AutoencoderKL as Reference

    with torch.device("meta"):
        reference = Reference(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    abstract = nnx.eval_shape(lambda: AutoencoderKL(base_config(), rngs=InitKeys(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("shape,message", [
    ((1, 16, 16), r"\(N, H, W, 3\)"), ((1, 16, 16, 4), r"\(N, H, W, 3\)"), ((1, 15, 16, 3), "multiples of 2"),
])
def test_bad_images_are_refused_clearly(pair, shape, message):
    _, model = pair
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.encode, jax.ShapeDtypeStruct(shape, jnp.float32))
