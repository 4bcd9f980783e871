"""VideoCrafter1/2 `model.ckpt` files as they are released: every part of the four released configs by key and shape
(tests/fixtures/manifests/inference_*.json, upstream `LatentDiffusion.state_dict()`, no weights, no compute); a tiny
model written as a real torch `model.ckpt` (Lightning `state_dict` and DeepSpeed `module` layouts) loads back to
exactly its parameters; files of the wrong family, release or size are refused with the config to use."""
from __future__ import annotations

import functools
import math
import pathlib
import re

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from conftest import load_config, randomize_nnx, manifest, shapes_only
from vdjax.convert import converted, formats, readers, sources, videocrafter
from vdjax.convert.keymap import KeyMapError, plan
from vdjax.convert.readers import CheckpointError

MANIFESTS = pathlib.Path(__file__).parent / "fixtures/manifests"
RELEASED = {"t2v_1024_v1": "inference_t2v_1024_v1.0", "t2v_512_v1": "inference_t2v_512_v1.0",
            "i2v_512_v1": "inference_i2v_512_v1.0", "t2v_512_v2": "inference_t2v_512_v2.0"}
# Parameters per part of the full-size models (the released files' tensors, less the unused OpenCLIP leftovers).
COUNTS = {
    "t2v_1024_v1": dict(unet=1_146_536_516),
    "t2v_512_v1": dict(unet=1_144_485_956),
    "i2v_512_v1": dict(unet=1_438_843_460, image_encoder=630_763_520, image_proj=48_541_696),
    "t2v_512_v2": dict(unet=1_413_284_420),
}
VAE, TEXT = 83_653_863, 352_984_064
# Keys of a released file that no vdjax model reads, besides the root schedule buffers.
UNUSED = {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}
UNUSED_I2V = {f"embedder.model.{k}" for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight",
                                              "ln_final.bias", "text_projection", "logit_scale",
                                              "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj")}




@functools.lru_cache(None)
def config(variant: str):
    return load_config(f"configs/videocrafter.py:variant={variant}")


_ABSTRACT = {}


def abstract(part: str, variant: str):
    """Abstract parts, built once per distinct config section (the VAE and text tower are shared by all four)."""
    key = (part, config(variant)[part].to_json(sort_keys=True))
    if key not in _ABSTRACT:
        _ABSTRACT[key] = sources.abstract_part(part, config(variant))
    return _ABSTRACT[key]


def count(model) -> int:
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("variant", sorted(RELEASED))
def test_released_checkpoint_maps_completely(variant):
    m, cfg = manifest(RELEASED[variant]), config(variant)
    state = shapes_only(m["keys"], RELEASED[variant])
    assert formats.detect(state) == "videocrafter"
    parts = sources.config_parts(cfg)
    assert parts == (("unet", "vae", "text_encoder") + (("image_encoder", "image_proj") if "i2v" in variant else ()))
    used, counts = set(), {}
    for part in parts:
        model = abstract(part, variant)
        videocrafter.check_file(part, state, "videocrafter", cfg, RELEASED[variant])
        pm = sources.part_map(part, "videocrafter", cfg)
        # Strict: every parameter has its key with its shape, every other key is another part's or named.
        mapping = plan(model, pm.prepare(state), pm.key_fn, ignore=pm.ignore, source=f"{variant} {part}")
        used |= {re.sub(r"\.in_proj_[qkv]\.", ".in_proj_", k) for k in mapping.values()}  # packed in the file
        counts[part] = count(model)
    rest = set(m["keys"]) - used
    assert rest == set(m["buffers"]) | UNUSED | (UNUSED_I2V if "i2v" in variant else set())
    assert all(videocrafter.ignored(k) for k in rest)
    assert counts == {**COUNTS[variant], "vae": VAE, "text_encoder": TEXT}
    # The UNet, VAE and resampler are every tensor of their prefix; the towers all but the unused leftovers.
    total = lambda prefix: sum(math.prod(s) for k, s in m["keys"].items() if k.startswith(prefix) and k not in rest)
    assert {p: total(videocrafter.PREFIXES[p]) for p in parts} == counts
    print(f"\n{variant}: " + ", ".join(f"{p} {n:,}" for p, n in counts.items()) + f"; total {sum(counts.values()):,}")


def test_release_flags_and_detection():
    for variant, name in RELEASED.items():
        keys = manifest(name)["keys"]
        assert videocrafter.release_of(videocrafter.file_flags(keys)) == variant
        assert videocrafter.config_flags(config(variant)) == videocrafter.RELEASES[variant]
        assert videocrafter.config_flags(config("tiny_" + variant)) == videocrafter.RELEASES[variant]
    assert formats.detect(["model.diffusion_model.init_attn.0.proj_in.weight"]) == "videocrafter"
    assert formats.detect(["model.diffusion_model.input_blocks.1.0.temopral_conv.conv1.0.weight"]) == "videocrafter"
    assert formats.detect(["image_proj_model.latents"]) == "videocrafter"
    for sd in ("sd15_ldm", "sd21base_ldm"):  # SD's slot 2 is a ResBlock or an upsampler, never a transformer
        assert formats.detect(manifest(sd)["keys"]).startswith("ldm_sd")


# ---------------------------------------------------------------------------------------------------------------
# A tiny model.ckpt in the released layout.

def _torch_layout(path, value: np.ndarray) -> np.ndarray:
    """vdjax -> torch: Linear (in, out) -> (out, in), Conv (*k, I, O) -> (O, I, *k); the rest is stored alike."""
    if path[-1] != "kernel" or value.ndim < 2:
        return value
    return value.transpose(value.ndim - 1, value.ndim - 2, *range(value.ndim - 2))


def _params(model) -> dict:
    return {p: np.asarray(v.get_raw_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def released_state_dict(models: dict, cfg) -> dict[str, np.ndarray]:
    """What upstream's `model.state_dict()` holds for these parameters: its key names and layouts, the OpenCLIP
    projections packed, the VAE attention as 1x1 convs, the unused tower leftovers and the schedule buffers."""
    out = {}
    for part, model in models.items():
        key_fn = videocrafter.part_map(part, cfg).key_fn
        for path, value in _params(model).items():
            out[key_fn(path)] = _torch_layout(path, value)
    for key in [k for k in out if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", k)]:
        out[key] = out[key][:, :, None, None]
    for key in [k for k in out if ".in_proj_q." in k]:
        out[key.replace(".in_proj_q.", ".in_proj_")] = np.concatenate(
            [out.pop(key.replace("in_proj_q", f"in_proj_{q}")) for q in "qkv"], axis=0)
    rng = np.random.default_rng(1)
    extra = UNUSED | (UNUSED_I2V if "image_encoder" in models else set())
    out.update({k: rng.standard_normal((4, 4)).astype(np.float32) for k in extra})
    out.update({k: np.linspace(0, 1, 1000, dtype=np.float32) for k in manifest(RELEASED["i2v_512_v1"])["buffers"]})
    return out


@functools.lru_cache(None)
def tiny_models(variant: str) -> dict:
    cfg = config(variant)
    models = {}
    for i, part in enumerate(sources.config_parts(cfg)):
        model = sources.abstract_part(part, cfg)
        randomize_nnx(model, seed=i)  # every parameter drawn (zero-initialised ones included)
        models[part] = model
    return models


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{variant: (Lightning model.ckpt, DeepSpeed checkpoint)} of random tiny models."""
    root = tmp_path_factory.mktemp("videocrafter")
    files = {}
    for variant in ("tiny_i2v_512_v1", "tiny_t2v_1024_v1"):
        state = {k: torch.from_numpy(np.array(v, order="C"))
                 for k, v in released_state_dict(tiny_models(variant), config(variant)).items()}
        lightning, deepspeed = root / f"{variant}.ckpt", root / f"{variant}_deepspeed.pt"
        torch.save({"state_dict": state, "epoch": 3, "global_step": 1200}, lightning)
        torch.save({"module": {"_forward_module." + k: v for k, v in state.items()}, "ds_version": "0.9.2"},
                   deepspeed)
        files[variant] = (lightning, deepspeed)
    return files


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for part in want:
        a, b = _params(got[part]), _params(want[part])
        assert a.keys() == b.keys(), part
        assert [p for p in a if not np.array_equal(a[p], b[p])] == [], part


@pytest.mark.parametrize("variant", ["tiny_i2v_512_v1", "tiny_t2v_1024_v1"])
def test_tiny_model_ckpt_round_trip(ckpts, variant, tmp_path):
    cfg, want = config(variant), tiny_models(variant)
    for path in ckpts[variant]:
        models = sources.load_models(cfg, model=str(path))
        _same(models, want)
    if variant.startswith("tiny_t2v"):  # a DeepSpeed state dict re-saved flat keeps the prefix on every key
        state = readers.read_state_dict(str(ckpts[variant][0]))
        flat = str(tmp_path / "flat.safetensors")
        save_file({"_forward_module." + k: np.ascontiguousarray(state[k]) for k in state}, flat)
        _same(sources.load_models(cfg, model=flat), want)
    if variant.startswith("tiny_i2v"):  # the converted folder (Orbax per part) keeps the image branch
        summary = converted.save(str(tmp_path / "model"), cfg, models)
        assert set(summary["parts"]) == set(want)
        restored_config, restored = converted.load(str(tmp_path / "model"))
        _same(restored, want)
        assert sources.config_parts(restored_config) == sources.config_parts(cfg)
        # One part from its own file (here the whole file, as a per-part argument).
        assert set(sources.load_models(cfg, image_proj=str(ckpts[variant][0]))) == {"image_proj"}


def test_missing_unet_key_is_named(ckpts, tmp_path):
    cfg = config("tiny_i2v_512_v1")
    state = torch.load(ckpts["tiny_i2v_512_v1"][0], weights_only=True)["state_dict"]
    gone = "model.diffusion_model.input_blocks.1.2.transformer_blocks.0.attn1.to_q.weight"
    del state[gone]
    state["model.diffusion_model.not_a_layer.weight"] = torch.zeros(2)
    torch.save({"state_dict": state}, tmp_path / "broken.ckpt")
    with pytest.raises(KeyMapError) as err:
        sources.load_models(cfg, model=str(tmp_path / "broken.ckpt"))
    assert err.value.missing == [gone] and err.value.unexpected == ["model.diffusion_model.not_a_layer.weight"]
    assert "broken.ckpt" in str(err.value)
    # A key under no part's prefix is no part's: refused too (upstream loads with strict=True).
    state = torch.load(ckpts["tiny_t2v_1024_v1"][0], weights_only=True)["state_dict"]
    torch.save({"state_dict": {**state, "stray": torch.zeros(1)}}, tmp_path / "stray.ckpt")
    with pytest.raises(KeyMapError, match="1 unexpected key.*\n    stray"):
        sources.load_models(config("tiny_t2v_1024_v1"), model=str(tmp_path / "stray.ckpt"), parts=["vae"])


def test_wrong_release_or_family_names_the_config_to_use(ckpts):
    t2v, i2v = str(ckpts["tiny_t2v_1024_v1"][0]), str(ckpts["tiny_i2v_512_v1"][1])
    with pytest.raises(CheckpointError, match=r"looks like a VideoCrafter t2v_1024_v1 checkpoint.*variant "
                                              r"tiny_i2v_512_v1.*use --config=configs/videocrafter.py:variant="
                                              r"tiny_t2v_1024_v1"):
        sources.load_models(config("tiny_i2v_512_v1"), model=t2v)
    with pytest.raises(CheckpointError, match=r"VideoCrafter i2v_512_v1 checkpoint.*variant=tiny_i2v_512_v1"):
        sources.load_models(config("tiny_t2v_1024_v1"), model=i2v)
    with pytest.raises(CheckpointError, match=r"tiny_t2v_1024_v1\) has no image_encoder; its parts are unet, vae, "
                                              r"text_encoder"):
        sources.load_models(config("tiny_t2v_1024_v1"), model=i2v, parts=["image_encoder"])
    # The VAE and text tower are the same in every release: they load from another release's file.
    assert set(sources.load_models(config("tiny_t2v_512_v2"), model=t2v, parts=["vae", "text_encoder"])) == \
        {"vae", "text_encoder"}
    # A VideoCrafter file for another family's config, and the other way round.
    with pytest.raises(CheckpointError, match=r"animatediff config.*is not VideoCrafter's; use --config=configs/"
                                              r"videocrafter.py:variant=tiny_t2v_1024_v1"):
        sources.load_models(load_config("configs/animatediff_sd15.py:variant=tiny_v2"), model=t2v)
    sd = shapes_only(manifest("sd21base_ldm")["keys"], "v2-1_512-ema-pruned.ckpt")
    with pytest.raises(CheckpointError, match=r"v2-1_512-ema-pruned.ckpt is not a VideoCrafter model.ckpt but "
                                              r"a ldm_sd2 file"):
        sources.load_part("unet", config("tiny_t2v_512_v2"), {"unet": sd})
    sd = shapes_only(manifest("sd15_ldm")["keys"], "v1-5.safetensors")
    with pytest.raises(CheckpointError, match=r"loads with configs/animatediff_sd15.py"):
        sources.load_part("unet", config("tiny_t2v_512_v2"), {"unet": sd})


def test_full_size_file_with_a_tiny_config_and_dynamicrafter():
    state = shapes_only(manifest(RELEASED["t2v_512_v2"])["keys"], "model.ckpt")
    with pytest.raises(CheckpointError, match=r"320 channels.*has 32; use --config=configs/videocrafter.py:"
                                              r"variant=t2v_512_v2\."):
        sources.load_part("unet", config("tiny_t2v_512_v2"), {"unet": state})
    state = shapes_only(manifest("dynamicrafter_inference_512_v1.0")["keys"], "dynamicrafter_512.ckpt")
    with pytest.raises(CheckpointError, match="DynamiCrafter checkpoint"):
        sources.load_part("unet", config("tiny_i2v_512_v1"), {"unet": state})
