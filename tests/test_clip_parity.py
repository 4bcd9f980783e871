"""CLIP encoders vs transformers (PyTorch), float32 on CPU, every parameter re-randomised; preprocessing; bad input.

- Text: `CLIPTextModel` (legacy eos_token_id=2: pooled at argmax(ids)) and `CLIPTextModelWithProjection`
  (pooled at the first eos_token_id), last hidden state, clip skip 1 and 2, pooled output, text_embeds.
- Vision: `CLIPVisionModelWithProjection`: image_embeds, last and penultimate hidden states.
- Full-size parameter counts (vit_l14 text, vit_h14 vision) against transformers built on the meta device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import max_abs_error, randomize_torch
from vdjax.convert.hf_clip import load_text, load_vision
from vdjax.convert.keymap import KeyMapError
from vdjax.layers.primitives import InitKeys
from vdjax.models.clip import (CLIP_MEAN, CLIP_STD, CLIPTextModel, CLIPVisionModelWithProjection, clip_preprocess,
                               text_config, vision_config)

TOL = 1e-4
SHARED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
          "layer_norm_eps", "projection_dim")
TEXT_FIELDS = SHARED + ("vocab_size", "max_position_embeddings", "eos_token_id")
VISION_FIELDS = SHARED + ("image_size", "patch_size", "num_channels")


def _hf_text_config(cfg):
    from transformers import CLIPTextConfig
    # bos/pad ids inside the tiny vocabulary (the defaults, 49406 and 1, warn otherwise).
    return CLIPTextConfig(**{k: cfg[k] for k in TEXT_FIELDS}, bos_token_id=0, pad_token_id=1)


def _hf_vision_config(cfg):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(**{k: cfg[k] for k in VISION_FIELDS})


def _check(name, ours, ref):
    err = max_abs_error(ours, ref)
    print(f"{name}: max abs error {err:.2e}")
    assert err <= TOL, (name, err)


def _param_count(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _token_ids(batch, length, vocab, eos, ends, seed=0):
    """Random ids below `eos` (so eos is the largest), eos at `ends[i]` and repeated after it (SD 1.5's padding)."""
    ids = np.random.default_rng(seed).integers(3, eos, (batch, length))
    for row, end in zip(ids, ends):
        row[end:] = eos
    return ids


@pytest.fixture(scope="module")
def text_pair():
    from transformers import CLIPTextModel as HFText

    cfg = text_config("tiny")
    torch.manual_seed(0)
    reference = HFText(_hf_text_config(cfg)).eval()
    model = CLIPTextModel(cfg, rngs=InitKeys(0))
    load_text(model, randomize_torch(reference))
    return reference, model


@pytest.mark.parametrize("length", [16, 11])
def test_text_model_matches_transformers(text_pair, length):
    reference, model = text_pair
    cfg = model.config
    ids = _token_ids(3, length, cfg.vocab_size - 1, cfg.vocab_size - 1, ends=(4, length - 1, 7))
    with torch.no_grad():
        out = reference(torch.from_numpy(ids), output_hidden_states=True)
        skipped = {s: reference.final_layer_norm(out.hidden_states[-1 - s]).numpy() for s in (1, 2)}
    forward = nnx.jit(lambda m, x, skip: m(x, skip=skip), static_argnums=2)
    ours = forward(model, jnp.asarray(ids), 0)
    _check(f"text last_hidden_state T={length}", ours.last_hidden_state, out.last_hidden_state.numpy())
    _check(f"text pooled T={length}", ours.pooler_output, out.pooler_output.numpy())
    assert ours.text_embeds is None
    for s, ref in skipped.items():
        _check(f"text skip={s} T={length}", forward(model, jnp.asarray(ids), s).last_hidden_state, ref)


def test_text_model_with_projection_first_eos():
    """Newer configs: pooled at the first eos_token_id, which need not be the largest id; text_projection."""
    from transformers import CLIPTextModelWithProjection

    cfg = text_config("tiny")
    cfg.update(eos_token_id=5, with_projection=True, hidden_act="gelu")
    torch.manual_seed(1)
    reference = CLIPTextModelWithProjection(_hf_text_config(cfg)).eval()
    model = CLIPTextModel(cfg, rngs=InitKeys(0))
    load_text(model, randomize_torch(reference, seed=1), source="CLIPTextModelWithProjection")
    ids = np.random.default_rng(1).integers(10, cfg.vocab_size, (2, 12))
    ids[0, 3], ids[0, 8], ids[1, 10] = 5, 5, 5
    with torch.no_grad():
        out = reference(torch.from_numpy(ids))
    ours = model(jnp.asarray(ids))
    _check("text+projection last_hidden_state", ours.last_hidden_state, out.last_hidden_state.numpy())
    _check("text+projection text_embeds", ours.text_embeds, out.text_embeds.numpy())


def test_vision_model_matches_transformers():
    from transformers import CLIPVisionModelWithProjection as HFVision

    cfg = vision_config("tiny")
    torch.manual_seed(0)
    reference = HFVision(_hf_vision_config(cfg)).eval()
    model = CLIPVisionModelWithProjection(cfg, rngs=InitKeys(0))
    load_vision(model, randomize_torch(reference))
    pixels = np.random.default_rng(0).standard_normal((2, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    with torch.no_grad():
        out = reference(torch.from_numpy(pixels), output_hidden_states=True)
    ours = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    _check("vision image_embeds", ours.image_embeds, out.image_embeds.numpy())
    _check("vision last_hidden_state", ours.last_hidden_state, out.last_hidden_state.numpy())
    _check("vision hidden_states[-2]", ours.penultimate_hidden_state, out.hidden_states[-2].numpy())


def test_hub_prefixed_state_dict_loads(text_pair):
    """The Hub files (transformers 4.x) have `text_model.` keys; 5.x's plain CLIPTextModel (the fixture) has none."""
    reference, model = text_pair
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    prefixed = {"text_model." + k: v for k, v in state.items()}
    prefixed["text_model.embeddings.position_ids"] = np.arange(16)[None]  # saved by older versions: ignored
    other = CLIPTextModel(text_config("tiny"), rngs=InitKeys(1))
    load_text(other, prefixed)
    ids = jnp.asarray(_token_ids(1, 16, 999, 999, ends=(6,)))
    assert max_abs_error(other(ids).last_hidden_state, model(ids).last_hidden_state) == 0.0


def test_bfloat16_compute_stays_close(text_pair):
    """config.dtype='bfloat16' runs (parameters stay float32, outputs float32) and tracks the float32 result."""
    reference, model = text_pair
    cfg = text_config("tiny")
    cfg.dtype = "bfloat16"
    low = CLIPTextModel(cfg, rngs=InitKeys(0))
    nnx.update(low, nnx.state(model, nnx.Param))
    ids = jnp.asarray(_token_ids(2, 16, 999, 999, ends=(5, 12)))
    forward = nnx.jit(lambda m, x: m(x))
    a, b = forward(model, ids).last_hidden_state, forward(low, ids).last_hidden_state
    assert b.dtype == jnp.float32 and max_abs_error(a, b) < 0.1 * float(jnp.std(a))
    vcfg = vision_config("tiny")
    vcfg.dtype = "bfloat16"
    out = forward(CLIPVisionModelWithProjection(vcfg, rngs=InitKeys(0)), jnp.ones((1, 16, 16, 3)))
    assert out.image_embeds.dtype == jnp.float32 and bool(jnp.isfinite(out.penultimate_hidden_state).all())


def test_wrong_checkpoint_is_refused(text_pair):
    cfg = text_config("tiny")
    cfg.num_hidden_layers = 2
    with pytest.raises(KeyMapError, match="unexpected"):
        load_text(CLIPTextModel(cfg, rngs=InitKeys(0)), {k: v.numpy() for k, v in text_pair[0].state_dict().items()})


@pytest.mark.parametrize("tower", ["text_vit_l14", "vision_vit_h14"])
def test_full_size_parameter_count_matches_transformers(tower):
    from transformers import CLIPTextModel as HFText, CLIPVisionModelWithProjection as HFVision

    if tower.startswith("text"):
        cfg, ours = text_config("vit_l14"), CLIPTextModel
        hf_cls, hf_cfg = HFText, _hf_text_config(cfg)
    else:
        cfg, ours = vision_config("vit_h14"), CLIPVisionModelWithProjection
        hf_cls, hf_cfg = HFVision, _hf_vision_config(cfg)
    with torch.device("meta"):
        expected = sum(p.numel() for p in hf_cls(hf_cfg).parameters())
    assert _param_count(nnx.eval_shape(lambda: ours(cfg, rngs=InitKeys(0)))) == expected


# ---- preprocessing -------------------------------------------------------------------------------------------


def _hf_pixels(image: np.ndarray) -> np.ndarray:
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = CLIPImageProcessorPil()(images=Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    return out.transpose(1, 2, 0)


def test_normalisation_is_exact():
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    ours = np.asarray(clip_preprocess(image))
    expected = (image / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    _check("preprocess vs formula (float64)", ours, expected)
    assert max_abs_error(ours, _hf_pixels(image)) <= 1e-6


@pytest.mark.parametrize("shape", [(300, 257), (180, 400)])
def test_resize_and_crop_close_to_transformers(shape):
    """Not bit-exact (JAX float bicubic vs PIL 8-bit), but the same geometry: shorter side, centre crop."""
    smooth = np.linspace(0, 1, shape[0])[:, None, None] * np.linspace(0.2, 1, shape[1])[None, :, None]
    image = (255 * smooth * np.array([1.0, 0.6, 0.3])).round().astype(np.uint8)
    err = max_abs_error(clip_preprocess(image), _hf_pixels(image))
    print(f"preprocess resize {shape}: max abs error vs PIL path {err:.2e}")
    assert err < 0.05  # ~ one grey level in normalised units (1 / 255 / 0.26 = 0.015), plus resampling


def test_grayscale_and_rgba_become_rgb():
    rgb = np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    as_rgb = clip_preprocess(np.repeat(gray[..., None], 3, axis=-1), size=16)
    for image in (gray, gray[..., None]):
        assert max_abs_error(clip_preprocess(image, size=16), as_rgb) == 0.0
    rgba = np.concatenate([rgb, np.full((40, 30, 1), 7, np.uint8)], axis=-1)
    assert max_abs_error(clip_preprocess(rgba, size=16), clip_preprocess(rgb, size=16)) == 0.0
    assert clip_preprocess(rgba, size=16).shape == (16, 16, 3)


@pytest.mark.parametrize("shape", [(8,), (8, 8, 2), (8, 8, 5), (2, 8, 8, 3)])
def test_preprocess_rejects_other_shapes(shape):
    with pytest.raises(ValueError, match=r"3 \(RGB\) or 4 \(RGBA\)"):
        clip_preprocess(np.zeros(shape, np.uint8))


# ---- bad input to the models ---------------------------------------------------------------------------------


def test_models_reject_bad_input(text_pair):
    model = text_pair[1]
    for ids, match in ((jnp.zeros((16,), jnp.int32), "batch, tokens"), (jnp.zeros((1, 17), jnp.int32), "<= 16"),
                       (jnp.zeros((1, 4), jnp.float32), "integer")):
        with pytest.raises(ValueError, match=match):
            model(ids)
    for skip in (-1, 3, 1.0):
        with pytest.raises(ValueError, match="skip"):
            model(jnp.zeros((1, 4), jnp.int32), skip=skip)
    vision = CLIPVisionModelWithProjection(vision_config("tiny"), rngs=InitKeys(0))
    for shape in ((1, 3, 16, 16), (16, 16, 3), (1, 16, 16, 4), (1, 32, 32, 3)):
        with pytest.raises(ValueError, match="channels-last"):
            vision(jnp.zeros(shape))
    cfg = text_config("tiny")
    cfg.hidden_act = "relu6"
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextModel(cfg, rngs=InitKeys(0))
    with pytest.raises(ValueError, match="unknown CLIP text config"):
        text_config("vit_b32")
