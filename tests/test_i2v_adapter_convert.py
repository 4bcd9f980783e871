"""I2V-Adapter's and IP-Adapter's released files as they are: full size by key and shape (the manifests in
tests/fixtures/manifests, no weights, no compute), a tiny model written as real torch / safetensors files in the
released layouts that loads back to exactly its parameters, each UNet parameter from exactly one file, and files
for another base or with a site missing refused with what to use.

Layouts (see vdjax/convert/i2v_adapter.py, vdjax/convert/ip_adapter.py):
- i2v_module.pth: `<site>.transformer_blocks.0.attn1.to_q_ff.weight` / `.to_out_ff.weight` / `.to_out_ff.bias`.
- animatediff_v15_v1_ipplus.pth (no manifest; inferred from upstream `from_pretrained_ip`): the whole UNet3D state
  dict: diffusers-named spatial UNet, AnimateDiff v1 motion modules (original names, 24-long `pos_encoder.pe`) and
  `<site>.transformer_blocks.0.attn2.to_k_ip.weight` / `.to_v_ip.weight`.
- ip-adapter(-plus)_sd15: `image_proj.*` + `ip_adapter.<idx>.to_k_ip/to_v_ip.weight` (.safetensors), or
  `{'image_proj': {...}, 'ip_adapter': {...}}` (.bin).
"""
from __future__ import annotations

import functools
import logging
import math
import pathlib
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from conftest import load_config, randomize_nnx, randomize_torch, manifest, shapes_only
from vdjax.convert import animatediff, converted, diffusers, formats, hf_clip, i2v_adapter, ip_adapter, readers, sources
from vdjax.convert.keymap import KeyMapError, to_flax_layout
from vdjax.convert.readers import CheckpointError, LazyStateDict
from vdjax.models import resampler

MANIFESTS = pathlib.Path(__file__).parent / "fixtures/manifests"
SPEC = "configs/i2v_adapter_sd15.py:variant={}"
# The paper's "~24M" trainable parameters: to_q_ff (C x C) and to_out_ff (C x C + C) at the 16 spatial
# self-attentions of SD 1.5 (5 x 320, 5 x 640, 6 x 1280 channels).
FIRST_FRAME_PARAMS = 24_793_280
IMAGE_KV_PARAMS = 19_169_280        # to_k_ip + to_v_ip, (C, 768) each at the 16 cross-attentions
RESAMPLER_PARAMS = 29_918_208       # IP-Adapter-Plus SD 1.5 image_proj
IMAGE_PROJ_MODEL_PARAMS = 3_150_336  # plain IP-Adapter SD 1.5 image_proj (1024 -> 4 x 768, LayerNorm)




def config(variant: str, adapter: str = "plus"):
    """The I2V-Adapter config, or (adapter='plain') the same with plain IP-Adapter's ImageProjModel (4 tokens)."""
    cfg = load_config(SPEC.format(variant))
    if adapter == "plain":
        cfg.unet.image_context_tokens = 4
        cfg.image_proj = (resampler.image_proj_config("ip_adapter_sd15") if variant == "sd15" else
                          resampler.image_proj_config("tiny", cross_attention_dim=cfg.unet.cross_attention_dim,
                                                      clip_embeddings_dim=cfg.image_encoder.projection_dim))
        cfg.image_proj.kind = "image_proj_model"
    return cfg


@functools.lru_cache(None)
def abstract(part: str, variant: str, adapter: str = "plus"):
    return sources.abstract_part(part, config(variant, adapter))


def count(model, select=lambda path: True) -> int:
    return sum(math.prod(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if select(p))


def _sites_from_notes(name: str) -> dict[int, str]:
    notes = manifest(name)["notes"]
    listing = re.search(r"idx -> UNet attention: (.*?)\. Derived", notes)[1]
    return {int(i): site for i, site in (item.split("=") for item in listing.split(", "))}


@functools.lru_cache(None)
def companion_keys(ip_name: str = "ip_adapter_plus_sd15") -> dict:
    """A full-size animatediff_v15_v1_ipplus.pth by key and shape, as from_pretrained_ip's UNet3D holds it:
    diffusers' SD 1.5 UNet names (a meta-device UNet2DConditionModel), mm_sd_v15's motion keys, and the IP-Adapter
    projections under their UNet sites."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
    sites = _sites_from_notes(ip_name)
    image_kv = {}
    for key, shape in manifest(ip_name)["keys"].items():
        if m := ip_adapter.ADAPTER_KEY.match(key):
            image_kv[f"{sites[int(m[1])]}.{m[2]}.weight"] = shape
    return {**{k: tuple(v.shape) for k, v in unet.state_dict().items()}, **manifest("animatediff_mm_sd_v15")["keys"],
            **image_kv}


def full_sources(motion: str = "mm", ip: str = "ip_adapter_plus_sd15") -> dict:
    src = {"unet": shapes_only(manifest("sd15_ldm")["keys"], "v1-5-pruned.safetensors"),
           "i2v_module": shapes_only(manifest("i2v_adapter_i2v_module")["keys"], "i2v_module.pth"),
           "ip_adapter": shapes_only(manifest(ip)["keys"], f"{ip}.bin")}
    src["motion"] = (shapes_only(manifest("animatediff_mm_sd_v15")["keys"], "mm_sd_v15.ckpt") if motion == "mm" else
                     shapes_only(companion_keys(), "animatediff_v15_v1_ipplus.pth"))
    src["image_proj"] = src["ip_adapter"]
    return src


def _namespaces(mapping: dict) -> dict[str, int]:
    out = {}
    for key in mapping.values():
        out[key.partition(":")[0]] = out.get(key.partition(":")[0], 0) + 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# Full size, by key and shape.

def test_layouts_are_detected():
    assert formats.detect(manifest("i2v_adapter_i2v_module")["keys"]) == "i2v_adapter_module"
    assert formats.detect(manifest("ip_adapter_sd15")["keys"]) == "ip_adapter"
    assert formats.detect(manifest("ip_adapter_plus_sd15")["keys"]) == "ip_adapter"
    assert formats.detect(companion_keys()) == "i2v_adapter_unet"
    assert formats.detect(manifest("animatediff_mm_sd_v15")["keys"]) == "animatediff_motion"
    assert formats.detect(["ip_adapter.1.to_k_ip.weight"]) == "ip_adapter"  # the .bin's ip_adapter part alone


def test_i2v_module_manifest_fills_the_first_frame_attention():
    cfg, unet = config("sd15"), abstract("unet", "sd15")
    mapping = sources.plan_part("unet", cfg, full_sources(), unet)
    assert _namespaces(mapping) == {"unet": 686, "motion": 520, "i2v": 48, "ip": 32}
    used = {k.partition(":")[2] for k in mapping.values() if k.startswith("i2v:")}
    assert used == set(manifest("i2v_adapter_i2v_module")["keys"])
    trainable = count(unet, i2v_adapter.is_first_frame_param)
    assert trainable == FIRST_FRAME_PARAMS == sum(math.prod(s) for s in manifest("i2v_adapter_i2v_module")["keys"]
                                                  .values())
    assert count(unet, ip_adapter.is_image_kv_param) == IMAGE_KV_PARAMS
    print(f"\nI2V-Adapter SD 1.5: first-frame attention (to_q_ff + to_out_ff) {trainable:,} trainable parameters "
          f"(paper: ~24M); IP-Adapter to_k_ip/to_v_ip {IMAGE_KV_PARAMS:,}; UNet total {count(unet):,}")


@pytest.mark.parametrize("adapter", ["plus", "plain"])
def test_ip_adapter_manifests_map_completely(adapter):
    name = {"plus": "ip_adapter_plus_sd15", "plain": "ip_adapter_sd15"}[adapter]
    cfg, unet = config("sd15", adapter), abstract("unet", "sd15")  # the same parameters for both adapters
    # idx -> site: vdjax's order of the UNet's cross-attentions is diffusers' attn_processors order.
    order = ip_adapter.attention_sites(unet)
    assert {2 * i + 1: ".".join(map(str, site)) for i, site in enumerate(order)} == \
        _sites_from_notes(name)
    src = full_sources(ip=name)
    mapping = sources.plan_part("unet", cfg, src, unet)
    ip_keys = {k.partition(":")[2] for k in mapping.values() if k.startswith("ip:")}
    assert ip_keys == {k for k in manifest(name)["keys"] if k.startswith("ip_adapter.")}
    proj = abstract("image_proj", "sd15", adapter)
    assert type(proj).__name__ == {"plus": "Resampler", "plain": "ImageProjModel"}[adapter]
    proj_keys = set(sources.plan_part("image_proj", cfg, src, proj).values())
    assert proj_keys == {k for k in manifest(name)["keys"] if k.startswith("image_proj.")}
    assert count(proj) == {"plus": RESAMPLER_PARAMS, "plain": IMAGE_PROJ_MODEL_PARAMS}[adapter]
    assert count(proj) + IMAGE_KV_PARAMS == sum(math.prod(s) for s in manifest(name)["keys"].values())


def test_companion_file_as_motion_module_or_as_the_unet():
    """animatediff_v15_v1_ipplus.pth next to SD 1.5: motion modules and image K/V from it, its spatial weights
    ignored by name (the base model's win); alone as unet=: everything but the first-frame attention."""
    cfg, unet = config("sd15"), abstract("unet", "sd15")
    src = full_sources(motion="companion")
    mapping = sources.plan_part("unet", cfg, src, unet)
    assert _namespaces(mapping) == {"unet": 686, "motion": 552, "i2v": 48}
    src = {"unet": src["motion"], "i2v_module": src["i2v_module"], "ip_adapter": src["ip_adapter"]}
    mapping = sources.plan_part("unet", cfg, src, unet)
    assert _namespaces(mapping) == {"unet": 686 + 552, "i2v": 48}


def test_full_size_image_encoder_is_transformers_layout():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = config("sd15")
    v = cfg.image_encoder
    with torch.device("meta"):
        hf = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
            projection_dim=v.projection_dim, hidden_act=v.hidden_act))
    state = shapes_only({k: tuple(t.shape) for k, t in hf.state_dict().items()}, "models/image_encoder")
    assert formats.detect(state) == "hf_clip_vision"
    model = sources.abstract_part("image_encoder", cfg)
    mapping = sources.plan_part("image_encoder", cfg, {"image_encoder": state}, model)
    assert len(mapping) == len([k for k in state if not hf_clip.ignored(k)])


# ---------------------------------------------------------------------------------------------------------------
# A tiny model in the released files.

def _torch_layout(path, value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel" or value.ndim < 2:
        return value
    return value.transpose(value.ndim - 1, value.ndim - 2, *range(value.ndim - 2))


def _params(model) -> dict:
    return {p: np.asarray(v.get_raw_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _random(part: str, variant: str, seed: int, adapter: str = "plus") -> dict:
    model = sources.abstract_part(part, config(variant, adapter))
    randomize_nnx(model, seed=seed)
    return _params(model)


def _spatial(path) -> bool:
    return not (animatediff.is_motion_param(path) or i2v_adapter.is_first_frame_param(path)
                or ip_adapter.is_image_kv_param(path))


def _t(value) -> torch.Tensor:
    return torch.from_numpy(np.array(value, order="C"))


@pytest.fixture(scope="module")
def tiny(snapshot, tmp_path_factory):
    """Released-layout files of random tiny models: {name: path}, and the parameters each should load to."""
    root = tmp_path_factory.mktemp("i2v_adapter")
    want, other = _random("unet", "tiny", 1), _random("unet", "tiny", 2)
    proj, plain_proj = _random("image_proj", "tiny", 3), _random("image_proj", "tiny", 4, "plain")
    sites = ip_adapter.attention_sites(abstract("unet", "tiny"))
    index = {site: 2 * i + 1 for i, site in enumerate(sites)}
    files = {}

    # Base: a diffusers snapshot (the conftest one's VAE, text encoder and tokenizer) whose UNet is `want`'s spatial
    # part, under exactly the keys and shapes diffusers itself saved for this UNet.
    base = root / "sd15_snapshot"
    shutil.copytree(snapshot[0], base)
    unet_file = base / "unet" / "diffusion_pytorch_model.safetensors"
    saved_by_diffusers = readers.read_state_dict(str(unet_file))
    unet_state = {diffusers.unet_key(p): _torch_layout(p, v) for p, v in want.items() if _spatial(p)}
    assert {k: saved_by_diffusers.shape(k) for k in saved_by_diffusers} == {k: v.shape for k, v in unet_state.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in unet_state.items()}, str(unet_file))
    files["model"] = base

    # animatediff_v15_v1_ipplus.pth: the whole UNet3D state dict; spatial and first-frame weights of another model
    # (they must not be read when a base is given), motion modules and image K/V of `want`.
    companion = {}
    for p, v in other.items():
        if _spatial(p) or i2v_adapter.is_first_frame_param(p):
            companion[diffusers.unet_key(p)] = _t(_torch_layout(p, v))
    for p, v in want.items():
        if animatediff.is_motion_param(p) or ip_adapter.is_image_kv_param(p):
            companion[i2v_adapter.unet_key(p)] = _t(_torch_layout(p, v))
    motion_keys = [k for k in companion if k.endswith("attention_blocks.0.to_q.weight")]
    for key in motion_keys:
        width = companion[key].shape[1]
        for i in (0, 1):
            pe = key.replace("attention_blocks.0.to_q.weight", f"attention_blocks.{i}.pos_encoder.pe")
            companion[pe] = torch.randn(1, 24, width)
    torch.save(companion, root / "animatediff_v15_v1_ipplus.pth")
    files["companion"] = root / "animatediff_v15_v1_ipplus.pth"
    # mm_sd_v15.ckpt-style: the motion modules alone (the keys upstream's load_weights keeps).
    torch.save({"state_dict": {k: v for k, v in companion.items() if "motion_modules." in k}},
               root / "mm_sd_v15.ckpt")
    files["mm"] = root / "mm_sd_v15.ckpt"

    # i2v_module.pth, nested under 'state_dict' (upstream accepts both).
    module = {i2v_adapter.module_key(p): _t(_torch_layout(p, v)) for p, v in want.items()
              if i2v_adapter.is_first_frame_param(p)}
    torch.save({"state_dict": module}, root / "i2v_module.pth")
    files["i2v_module"] = root / "i2v_module.pth"

    # IP-Adapter(-Plus) files: image_proj of `proj`, image K/V of `other` (so that it shows which file they came from).
    def ip_parts(image_proj: dict):
        proj_part = {resampler.image_proj_key(p, prefix=""): _torch_layout(p, v) for p, v in image_proj.items()}
        kv = {f"{index[p[:-2]]}.{p[-2]}.weight": _torch_layout(p, v) for p, v in other.items()
              if ip_adapter.is_image_kv_param(p)}
        return proj_part, kv
    for name, image_proj in (("ip-adapter-plus_sd15", proj), ("ip-adapter_sd15", plain_proj)):
        proj_part, kv = ip_parts(image_proj)
        torch.save({"image_proj": {k: _t(v) for k, v in proj_part.items()},
                    "ip_adapter": {k: _t(v) for k, v in kv.items()}}, root / f"{name}.bin")
        save_file({**{f"image_proj.{k}": np.ascontiguousarray(v) for k, v in proj_part.items()},
                   **{f"ip_adapter.{k}": np.ascontiguousarray(v) for k, v in kv.items()}},
                  str(root / f"{name}.safetensors"))
        files[name] = root / f"{name}.bin", root / f"{name}.safetensors"

    # IP-Adapter's models/image_encoder: a transformers folder.
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    v = config("tiny").image_encoder
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        projection_dim=v.projection_dim, hidden_act=v.hidden_act))
    encoder_state = randomize_torch(encoder, seed=5)
    encoder.save_pretrained(root / "image_encoder")
    files["image_encoder"] = root / "image_encoder"

    expected = {"want": want, "other": other, "proj": proj, "plain_proj": plain_proj, "encoder": encoder_state}
    return {k: (tuple(map(str, v)) if isinstance(v, tuple) else str(v)) for k, v in files.items()}, expected


def _check(model, want: dict) -> None:
    got = _params(model)
    assert got.keys() == want.keys()
    assert [p for p in got if not np.array_equal(got[p], want[p])] == []


def _unet_want(expected: dict, kv_from: str = "want") -> dict:
    out = dict(expected["want"])
    out.update({p: v for p, v in expected[kv_from].items() if ip_adapter.is_image_kv_param(p)})
    return out


def test_released_files_load_back_exactly(tiny, snapshot, tmp_path):
    files, expected = tiny
    cfg = config("tiny")
    for ip_file in files["ip-adapter-plus_sd15"]:  # .bin and .safetensors
        models = sources.load_models(cfg, model=files["model"], motion_module=files["companion"],
                                     i2v_module=files["i2v_module"], ip_adapter=ip_file,
                                     image_encoder=files["image_encoder"])
        assert set(models) == {"unet", "vae", "text_encoder", "image_encoder", "image_proj", "tokenizer_folder"}
        # The companion's image K/V are used (as upstream's inference); the IP-Adapter file gives image_proj.
        _check(models["unet"], _unet_want(expected, "want"))
        _check(models["image_proj"], expected["proj"])
    encoder = _params(models["image_encoder"])
    assert type(models["image_encoder"]).__name__ == "CLIPVisionModelWithProjection"
    for path, value in encoder.items():  # each tensor as transformers saved it, in vdjax's layout
        ref = expected["encoder"][hf_clip.vision_key(path)]
        np.testing.assert_array_equal(value, to_flax_layout(ref, value.ndim) if path[-1] == "kernel" else ref)
    # The VAE and text encoder are the snapshot's, as for any SD 1.5 config.
    reference = sources.load_models(load_config("configs/animatediff_sd15.py:variant=tiny_v1"), model=str(snapshot[0]),
                                    parts=["vae", "text_encoder"])
    for part in ("vae", "text_encoder"):
        _check(models[part], _params(reference[part]))
    # The converted folder keeps every part, the image encoder as transformers' CLIP vision model.
    converted.save(str(tmp_path / "model"), cfg, models)
    restored_config, restored = converted.load(str(tmp_path / "model"))
    assert sources.config_parts(restored_config) == sources.config_parts(cfg)
    for part in sources.config_parts(cfg):
        assert type(restored[part]) is type(models[part])
        _check(restored[part], _params(models[part]))


def test_ip_adapter_file_gives_image_kv_with_a_plain_motion_module(tiny):
    files, expected = tiny
    for ip_file in files["ip-adapter-plus_sd15"]:
        models = sources.load_models(config("tiny"), model=files["model"], motion_module=files["mm"],
                                     i2v_module=files["i2v_module"], ip_adapter=ip_file, parts=["unet", "image_proj"])
        _check(models["unet"], _unet_want(expected, "other"))
        _check(models["image_proj"], expected["proj"])
    # Plain IP-Adapter (ImageProjModel, 4 tokens) into a config that builds one.
    for ip_file in files["ip-adapter_sd15"]:
        models = sources.load_models(config("tiny", "plain"), model=files["model"], motion_module=files["mm"],
                                     i2v_module=files["i2v_module"], ip_adapter=ip_file, parts=["unet", "image_proj"])
        assert type(models["image_proj"]).__name__ == "ImageProjModel"
        _check(models["unet"], _unet_want(expected, "other"))
        _check(models["image_proj"], expected["plain_proj"])


def test_companion_as_the_unet_and_loras_on_top(tiny, tmp_path):
    files, expected = tiny
    models = sources.load_models(config("tiny"), unet=files["companion"], i2v_module=files["i2v_module"],
                                 parts=["unet"])
    want = dict(expected["want"])
    want.update({p: v for p, v in expected["other"].items() if _spatial(p)})  # the companion's own spatial weights
    _check(models["unet"], want)
    # A LoRA merges into the base's to_q, not into the adapter's to_q_ff.
    path = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn1")
    rng = np.random.default_rng(0)
    width = expected["want"][(*path, "to_q", "kernel")].shape[0]
    down, up = rng.standard_normal((2, width), dtype=np.float32), rng.standard_normal((width, 2), dtype=np.float32)
    module = "unet." + ".".join(map(str, path)) + ".to_q"
    save_file({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}, str(tmp_path / "lora.safetensors"))
    models = sources.load_models(config("tiny"), model=files["model"], motion_module=files["companion"],
                                 i2v_module=files["i2v_module"], ip_adapter=files["ip-adapter-plus_sd15"][0],
                                 loras=[(str(tmp_path / "lora.safetensors"), 0.5)], parts=["unet"])
    got = _params(models["unet"])
    np.testing.assert_allclose(got[(*path, "to_q", "kernel")],
                               expected["want"][(*path, "to_q", "kernel")] + 0.5 * (up @ down).T, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[(*path, "to_q_ff", "kernel")], expected["want"][(*path, "to_q_ff", "kernel")])


def test_without_i2v_module_the_adapter_starts_as_upstream(tiny, caplog):
    files, expected = tiny
    with caplog.at_level(logging.WARNING, logger="vdjax.convert.i2v_adapter"):
        models = sources.load_models(config("tiny"), model=files["model"], motion_module=files["companion"],
                                     ip_adapter=files["ip-adapter-plus_sd15"][1], parts=["unet"])
    assert "No I2V-Adapter module" in caplog.text
    got, want = _params(models["unet"]), expected["want"]
    ff = [p for p in got if i2v_adapter.is_first_frame_param(p)]
    assert len(ff) == 3 * len(ip_adapter.attention_sites(models["unet"]))
    for p in ff:
        if p[-2] == "to_q_ff":
            np.testing.assert_array_equal(got[p], want[i2v_adapter.to_q_path(p)])
        else:
            assert not got[p].any()
    assert all(np.array_equal(got[p], want[p]) for p in got if p not in ff)


# ---------------------------------------------------------------------------------------------------------------
# Bad input.

def _sdxl_ip_adapter(plus: bool) -> LazyStateDict:
    """ip-adapter_sdxl / ip-adapter-plus_sdxl_vit-h by key and shape: 2048-wide context, 70 cross-attentions."""
    keys = {f"ip_adapter.{2 * i + 1}.{kv}.weight": (640 if i < 4 else 1280, 2048)
            for i in range(70) for kv in ("to_k_ip", "to_v_ip")}
    if plus:
        keys.update({"image_proj.latents": (1, 16, 1280), "image_proj.proj_in.weight": (1280, 1280),
                     "image_proj.proj_out.weight": (2048, 1280), "image_proj.norm_out.weight": (2048,)})
    else:
        keys.update({"image_proj.proj.weight": (4 * 2048, 1280), "image_proj.norm.weight": (2048,)})
    return shapes_only(keys, "ip-adapter-plus_sdxl_vit-h.bin" if plus else "ip-adapter_sdxl.bin")


@pytest.mark.parametrize("plus", [True, False])
def test_sdxl_ip_adapter_is_refused_naming_sd15(plus):
    cfg = config("sd15", "plus" if plus else "plain")
    src = {**full_sources(), "ip_adapter": _sdxl_ip_adapter(plus), "image_proj": _sdxl_ip_adapter(plus)}
    for part in ("unet", "image_proj"):
        with pytest.raises(CheckpointError, match=r"IP-Adapter for SDXL.*2048.*768-wide cross-attention \(SD 1\.5\)"
                                                  r".*Use an SD 1\.5 IP-Adapter: ip-adapter_sd15"):
            sources.plan_part(part, cfg, src, abstract(part, "sd15", "plus" if plus or part == "unet" else "plain"))
    # SD 1.5's ViT-bigG variant (ip-adapter_sd15_vit-G): the right base, another image encoder.
    state = shapes_only({"image_proj.proj.weight": (4 * 768, 1280), "image_proj.norm.weight": (768,)}, "vit-G.bin")
    with pytest.raises(CheckpointError, match=r"1280-wide image embeds.*ip-adapter_sd15_vit-G.*clip_embeddings_dim=1024"):
        sources.plan_part("image_proj", config("sd15", "plain"), {"image_proj": state}, abstract("image_proj", "sd15",
                                                                                                  "plain"))
    # An image projection for SDXL's ViT-bigG (1280-wide embeds) alone, without the K/V part.
    state = shapes_only({"image_proj.proj.weight": (4 * 2048, 1280), "image_proj.norm.weight": (2048,)}, "proj.bin")
    with pytest.raises(CheckpointError, match=r"1280-wide image embeds to 2048-wide tokens \(SDXL; ViT-bigG.*SD 1\.5"):
        sources.plan_part("image_proj", config("sd15", "plain"), {"image_proj": state}, abstract("image_proj", "sd15",
                                                                                                  "plain"))


def test_wrong_kind_or_missing_pieces_say_what_to_do(tiny, tmp_path):
    files, _ = tiny
    cfg = config("tiny")
    # Plain IP-Adapter into the Plus config, and the other way round.
    with pytest.raises(CheckpointError, match=r"holds a plain IP-Adapter image projection \(ImageProjModel\), but .* "
                                              r"builds an IP-Adapter-Plus .*\(Resampler\); use config.image_proj = .*"
                                              r"image_proj_config\('ip_adapter_sd15'\).*image_context_tokens=4"):
        sources.load_models(cfg, ip_adapter=files["ip-adapter_sd15"][0], parts=["image_proj"])
    with pytest.raises(CheckpointError, match=r"holds an IP-Adapter-Plus .*\(Resampler\).*resampler_config"):
        sources.load_models(config("tiny", "plain"), ip_adapter=files["ip-adapter-plus_sd15"][1],
                            parts=["image_proj"])
    # A site missing from the IP-Adapter file.
    state = dict(readers.read_state_dict(files["ip-adapter-plus_sd15"][1]))
    del state["ip_adapter.3.to_k_ip.weight"], state["ip_adapter.3.to_v_ip.weight"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match=r"cut.safetensors has image key/value projections for 3 "
                                              r"cross-attentions, but .* UNet has 4"):
        sources.load_models(cfg, model=files["model"], motion_module=files["mm"], i2v_module=files["i2v_module"],
                            ip_adapter=str(tmp_path / "cut.safetensors"), parts=["unet"])
    # A site missing from i2v_module.pth: the strict map names it.
    module = torch.load(files["i2v_module"], weights_only=True)["state_dict"]
    gone = "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q_ff.weight"
    del module[gone]
    torch.save(module, tmp_path / "i2v_module.pth")
    with pytest.raises(KeyMapError) as err:
        sources.load_models(cfg, model=files["model"], motion_module=files["companion"],
                            i2v_module=str(tmp_path / "i2v_module.pth"), parts=["unet"])
    assert err.value.missing == [f"i2v:{gone}"] and "i2v_module.pth" in str(err.value)
    # No image K/V anywhere.
    with pytest.raises(CheckpointError, match=r"IP-Adapter cross-attention.*pass ip_adapter="):
        sources.load_models(cfg, model=files["model"], motion_module=files["mm"], parts=["unet"])
    # Adapter files for a config without those layers, or without a base.
    t2v = load_config("configs/animatediff_sd15.py:variant=tiny_v1")
    with pytest.raises(CheckpointError, match=r"no first-frame attention.*configs/i2v_adapter_sd15.py"):
        sources.load_models(t2v, model=files["model"], motion_module=files["mm"], i2v_module=files["i2v_module"],
                            parts=["unet"])
    with pytest.raises(CheckpointError, match="an I2V-Adapter module needs a base UNet"):
        sources.load_models(cfg, i2v_module=files["i2v_module"])
    with pytest.raises(CheckpointError, match=r"is not an I2V-Adapter module.*ip_adapter"):
        sources.load_models(cfg, model=files["model"], motion_module=files["mm"],
                            i2v_module=files["ip-adapter-plus_sd15"][0], parts=["unet"])
    with pytest.raises(TypeError, match="unknown model file argument.*ip_adaptor"):
        sources.load_models(cfg, model=files["model"], ip_adaptor=files["ip-adapter-plus_sd15"][0])
    # An AnimateDiff v2 motion module (32 positions) for the v1-based I2V-Adapter.
    companion = torch.load(files["companion"], weights_only=True)
    companion = {k: (torch.zeros(1, 32, v.shape[2]) if k.endswith(".pe") else v) for k, v in companion.items()}
    torch.save(companion, tmp_path / "v2.pth")
    with pytest.raises(ValueError, match="24-long table is AnimateDiff v1"):
        sources.load_models(cfg, model=files["model"], motion_module=str(tmp_path / "v2.pth"), parts=["unet"])


# ---------------------------------------------------------------------------------------------------------------
# IP-Adapter on its own, as diffusers loads it.

@pytest.mark.parametrize("adapter", ["plus", "plain"])
def test_ip_adapter_matches_diffusers_loading_the_same_file(tiny, adapter, tmp_path):
    """An SD 1.5 UNet (no motion module, no first-frame attention) + ip-adapter(-plus)_sd15.bin: vdjax's UNet and
    image projection vs diffusers' UNet2DConditionModel after `_load_ip_adapter_weights` of the same file (its
    IPAdapterAttnProcessor2_0 and IPAdapter(Plus)ImageProjection), on the same text and image features."""
    from diffusers import UNet2DConditionModel

    files, _ = tiny
    name = "ip-adapter-plus_sd15" if adapter == "plus" else "ip-adapter_sd15"
    cfg = config("tiny", adapter)
    cfg.unet.motion.kind, cfg.unet.first_frame_attention = "none", False
    state = torch.load(files[name][0], weights_only=True)
    if adapter == "plus":  # diffusers' conversion assumes 64-wide heads and depth 4 (SD 1.5's): give it those
        cfg.image_proj.update(dim_head=64, heads=2, depth=4)
        proj = sources.abstract_part("image_proj", cfg)
        randomize_nnx(proj, seed=6)
        state["image_proj"] = {resampler.image_proj_key(p, prefix=""): _t(_torch_layout(p, v))
                               for p, v in _params(proj).items()}
        torch.save(state, tmp_path / f"{name}.bin")
        files = {**files, name: (str(tmp_path / f"{name}.bin"),)}
    models = sources.load_models(cfg, model=files["model"], ip_adapter=files[name][0], parts=["unet", "image_proj"])
    reference = UNet2DConditionModel.from_pretrained(pathlib.Path(files["model"]) / "unet").eval()
    reference._load_ip_adapter_weights([state])

    rng = np.random.default_rng(0)
    u, v = cfg.unet, cfg.image_encoder
    x = rng.standard_normal((2, 1, 16, 16, u.in_channels)).astype(np.float32)
    t = np.array([981, 250])
    text = rng.standard_normal((2, u.text_context_tokens, u.cross_attention_dim)).astype(np.float32)
    features = (rng.standard_normal((2, (v.image_size // v.patch_size) ** 2 + 1, v.hidden_size)) if adapter == "plus"
                else rng.standard_normal((2, v.projection_dim))).astype(np.float32)
    with torch.no_grad():
        ref = reference(torch.from_numpy(x[:, 0].transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(text),
                        added_cond_kwargs={"image_embeds": [torch.from_numpy(features[:, None])]}).sample.numpy()
    tokens = models["image_proj"](jnp.asarray(features))
    assert tokens.shape == (2, u.image_context_tokens, u.cross_attention_dim)
    ours = models["unet"](jnp.asarray(x), jnp.asarray(t), jnp.concatenate([jnp.asarray(text), tokens], axis=1))
    err = float(np.max(np.abs(np.asarray(ours)[:, 0].transpose(0, 3, 1, 2) - ref)))
    print(f"IP-Adapter ({adapter}) vs diffusers: max abs error {err:.2e} (output std {ref.std():.3f})")
    assert err <= 1e-4 * max(1.0, float(ref.std()))
    blank = models["unet"](jnp.asarray(x), jnp.asarray(t), jnp.concatenate([jnp.asarray(text), 0 * tokens], axis=1))
    assert np.max(np.abs(np.asarray(blank)[:, 0].transpose(0, 3, 1, 2) - ref)) > 1e-2  # the image tokens count


def test_sample_script_from_the_released_files_with_a_lora(tiny, tmp_path):
    """End to end: launch/sample.py --config=configs/i2v_adapter_sd15.py with a base snapshot, the companion motion
    file, i2v_module.pth, ip-adapter-plus_sd15.safetensors, the image encoder folder and a LoRA; an image of another
    aspect ratio (RGBA) is cropped with a log line and animated into a video file."""
    import subprocess
    import sys

    from PIL import Image

    files, expected = tiny
    path = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn1")
    width = expected["want"][(*path, "to_q", "kernel")].shape[0]
    module = "unet." + ".".join(map(str, path)) + ".to_q"
    rng = np.random.default_rng(0)
    save_file({f"{module}.lora_A.weight": rng.standard_normal((2, width), dtype=np.float32),
               f"{module}.lora_B.weight": rng.standard_normal((width, 2), dtype=np.float32)},
              str(tmp_path / "lora.safetensors"))
    frame = tmp_path / "frame.png"
    Image.fromarray(rng.integers(0, 256, (40, 60, 4), dtype=np.uint8)).save(frame)
    cmd = [sys.executable, "launch/sample.py", "--config=configs/i2v_adapter_sd15.py:variant=tiny",
           f"--model={files['model']}", f"--motion_module={files['companion']}", f"--i2v_module={files['i2v_module']}",
           f"--ip_adapter={files['ip-adapter-plus_sd15'][1]}", f"--image_encoder={files['image_encoder']}",
           f"--lora={tmp_path / 'lora.safetensors'}:0.5", f"--image={frame}", "--prompt=a cat", "--steps=2",
           "--height=32", "--width=32", f"--output={tmp_path / 'out.gif'}"]
    run = subprocess.run(cmd, cwd=pathlib.Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "i2v_module=" in run.stdout and "image 60x40 cropped to 40x40" in run.stderr
    assert (tmp_path / "out.gif").stat().st_size > 0
